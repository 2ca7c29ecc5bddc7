"""The types every layer shares: what an engine takes and returns (`engine`), OpenAI's request and
response bodies (`openai`), and what an OpenAI-compatible server's errors mean (`server_errors`).
Imports nothing else from app."""
