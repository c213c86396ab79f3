"""wss:// and HTTPS checked by someone else's TLS stack: Python's ssl with `websockets`.

Usage: tls_check.py PORT CERT.pem. The certificate is trusted as the only CA and the
host name is checked (`localhost`). Exits non-zero with a message on the first mismatch.
"""
import asyncio
import json
import ssl
import sys

from websockets.asyncio.client import connect

PORT = int(sys.argv[1])
CTX = ssl.create_default_context(cafile=sys.argv[2])
TIMEOUT = 10


async def recv_json(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def https_get(path):
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", PORT, ssl=CTX, server_hostname="localhost"),
        TIMEOUT,
    )
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def main():
    url = f"wss://localhost:{PORT}/ws"
    a = await connect(f"{url}?user=py-a", ssl=CTX, ping_interval=None)
    b = await connect(f"{url}?user=py-b", ssl=CTX, ping_interval=None)
    for ws, user in ((a, "py-a"), (b, "py-b")):
        welcome = await recv_json(ws)
        assert welcome["type"] == "welcome" and welcome["user"] == user, welcome
    await a.send(json.dumps({"type": "send", "to": "py-b", "id": "q1", "data": {"s": "\u00e9"}}))
    ack = await recv_json(a)
    assert ack == {"type": "ack", "id": "q1", "delivered": 1}, ack
    msg = await recv_json(b)
    assert msg == {"type": "message", "from": "py-a", "data": {"s": "\u00e9"}}, msg
    await b.send(json.dumps({"type": "join", "room": "r", "id": 2}))
    assert (await recv_json(b)) == {"type": "ack", "id": 2}
    await a.send(json.dumps({"type": "publish", "room": "r", "id": 3, "data": "x" * 40000}))
    assert (await recv_json(a)) == {"type": "ack", "id": 3, "delivered": 1}
    msg = await recv_json(b)
    assert msg["room"] == "r" and msg["data"] == "x" * 40000, msg["room"]

    status, body = await https_get("/healthz")
    assert (status, body) == (200, "ok"), (status, body)
    status, body = await https_get("/api/presence/py-b")
    assert status == 200 and json.loads(body)["connections"] == 1, (status, body)

    await a.close()
    await b.close()
    assert a.close_code == 1000 and b.close_code == 1000, (a.close_code, b.close_code)
    print("tls check: ok")


asyncio.run(main())
