"""The wire protocol checked by someone else's client: Python `websockets`.

Usage: protocol_check.py HOST:PORT. Exits non-zero with a message on the first mismatch.
"""
import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

ADDR = sys.argv[1]
TIMEOUT = 10


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def open_user(user):
    # ping_interval=None: this client sends nothing on its own but still answers pings.
    ws = await connect(f"ws://{ADDR}/ws?user={user}", ping_interval=None)
    welcome = await recv_json(ws)
    assert welcome["type"] == "welcome" and welcome["user"] == user, welcome
    assert isinstance(welcome["conn"], str) and welcome["conn"], welcome
    return ws


async def main():
    a = await open_user("py-a")
    b1 = await open_user("py-b")
    b2 = await open_user("py-b")

    # send + ack with a string id; delivery to both of b's connections.
    raw = '{"type":"send","to":"py-b","id":"q1","data":{"n":18446744073709551617,"s":"\\u00e9"}}'
    await a.send(raw)
    ack = await recv_json(a)
    assert ack == {"type": "ack", "id": "q1", "delivered": 2}, ack
    for b in (b1, b2):
        text = await asyncio.wait_for(b.recv(), TIMEOUT)
        # byte-exact passthrough of data
        assert text == '{"type":"message","from":"py-a","data":{"n":18446744073709551617,"s":"\\u00e9"}}', text

    # numeric id keeps its type; offline user -> delivered 0
    await a.send(json.dumps({"type": "send", "to": "nobody", "id": 5, "data": None}))
    assert await recv_json(a) == {"type": "ack", "id": 5, "delivered": 0}

    # errors: bad_json, bad_user with id, binary frame -> bad_request; connection stays open
    await a.send("{oops")
    err = await recv_json(a)
    assert err["type"] == "error" and err["code"] == "bad_json" and "id" not in err, err
    await a.send(json.dumps({"type": "send", "to": "bad user", "id": 6, "data": 1}))
    err = await recv_json(a)
    assert err["code"] == "bad_user" and err["id"] == 6, err
    await a.send(b"\x01\x02")
    err = await recv_json(a)
    assert err["code"] == "bad_request", err
    await a.send(json.dumps({"type": "send", "to": "py-b", "id": 7, "data": [1]}))
    assert (await recv_json(a))["delivered"] == 2

    # rooms: join acks carry no `delivered`; publish reaches members with `room` set
    assert (await recv_json(b1))["data"] == [1]  # the id-7 send above
    await b1.send(json.dumps({"type": "join", "room": "py-room", "id": "j"}))
    assert await recv_json(b1) == {"type": "ack", "id": "j"}
    await a.send(json.dumps({"type": "publish", "room": "py-room", "id": 8, "data": {"x": 1}}))
    assert await recv_json(a) == {"type": "ack", "id": 8, "delivered": 1}
    msg = await recv_json(b1)
    assert msg == {"type": "message", "from": "py-a", "room": "py-room", "data": {"x": 1}}, msg
    await b1.send(json.dumps({"type": "leave", "room": "py-room", "id": 9}))
    assert await recv_json(b1) == {"type": "ack", "id": 9}

    # the client's close handshake is answered with the same code
    await b2.close(code=1000)
    assert b2.close_code == 1000, b2.close_code

    # a refused upgrade is a plain HTTP 401
    try:
        await connect(f"ws://{ADDR}/ws", ping_interval=None)
        raise AssertionError("upgrade without identity was accepted")
    except Exception as e:  # websockets raises InvalidStatus
        assert "401" in str(e), e

    # an oversized message closes with 1009 (gateway started with --max-message-size 4096)
    big = await open_user("py-big")
    await big.send(json.dumps({"type": "send", "to": "x", "data": "a" * 5000}))
    try:
        await asyncio.wait_for(big.recv(), TIMEOUT)
        raise AssertionError("oversized message was not refused")
    except ConnectionClosed as e:
        assert e.rcvd is not None and e.rcvd.code == 1009, e

    for ws in (a, b1):
        await ws.close()
    print("python websockets protocol check: ok")


asyncio.run(main())
