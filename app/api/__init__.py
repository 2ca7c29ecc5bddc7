"""The gateway's HTTP face: its OpenAI endpoints over the gateway core (`gateway_serving`: validation,
admission, preparation, then the model's engine client) and the bare ASGI app both the gateway's own
listener (app/http_listener.py) and Serve's proxy run. The only place that turns gateway and engine
errors into OpenAI errors."""
