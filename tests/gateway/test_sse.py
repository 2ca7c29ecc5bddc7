"""The event relay: whole events pass through as bytes, with the client's model name, without the usage
the client did not ask for, and the gateway learns what it must (first output, usage, errors, the end)."""

import json

from app.gateway.sse import EventRelay, model_renames


def event(chunk: dict | str, *, spaced: bool = False) -> bytes:
    data = chunk if isinstance(chunk, str) else json.dumps(chunk, separators=None if spaced else (",", ":"))
    return b"data: " + data.encode() + b"\n\n"


ROLE = {"model": "engine", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None}
TOKEN = {"model": "engine", "choices": [{"index": 0, "delta": {"content": "Hi"}}], "usage": None}
FINISH = {"model": "engine", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None}
USAGE = {"model": "engine", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
STREAM = event(ROLE) + event(TOKEN) + event(FINISH) + event(USAGE) + event("[DONE]")


def relay_all(relay: EventRelay, data: bytes, piece: int) -> bytes:
    out = b"".join(relay.feed(data[i:i + piece]) for i in range(0, len(data), piece))
    return out + relay.flush()


def test_events_cut_anywhere_come_out_whole_and_renamed():
    for piece in (1, 7, 64, len(STREAM)):
        relay = EventRelay(renames=model_renames("engine", "client"))
        out = relay_all(relay, STREAM, piece)
        assert out == STREAM.replace(b'"model":"engine"', b'"model":"client"')
        assert relay.first_output and relay.done and relay.usage == USAGE["usage"] and relay.error is None


def test_usage_the_client_did_not_ask_for_is_dropped_but_read():
    relay = EventRelay(keep_usage=False)
    out = relay_all(relay, STREAM, 13)
    assert b'"usage"' not in out and out.endswith(event("[DONE]"))
    assert relay.usage == USAGE["usage"]
    assert [json.loads(e[6:])["choices"][0].get("finish_reason") for e in out.split(b"\n\n")[:-2]] == [
        None, None, "stop"]


def test_the_opening_role_chunk_is_not_output_but_the_first_token_is():
    relay = EventRelay()
    relay.feed(event(ROLE))
    assert not relay.first_output
    relay.feed(event(TOKEN))
    assert relay.first_output


def test_errors_and_spaced_json_and_crlf_separators():
    relay = EventRelay(renames=model_renames("engine", "client"))
    error = {"error": {"message": "no", "type": "BadRequestError", "code": 400}}
    out = relay.feed(event(TOKEN, spaced=True) + event(error))
    assert b'"model": "client"' in out and relay.error == error["error"]
    crlf = EventRelay()
    out = crlf.feed(STREAM.replace(b"\n\n", b"\r\n\r\n")[:40]) + crlf.feed(STREAM.replace(b"\n\n", b"\r\n\r\n")[40:])
    assert crlf.done and crlf.first_output and out == STREAM.replace(b"\n\n", b"\r\n\r\n")
