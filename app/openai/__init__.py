"""Serving the OpenAI API over engines, shared by the gateway and engines' own servers: request
validation, model names, tokenizing and prefix keys (`prepare`), response building from engine outputs
(`engine_serving`), OpenAI error bodies (`errors`). Knows no routing, no Ray."""
