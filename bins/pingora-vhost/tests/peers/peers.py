"""Independent WebSocket and gRPC peers for the protocol tests (websockets, grpcio).

Servers print their port on the first line of stdout, then serve until killed. Clients print one
JSON line with what they saw and exit non-zero on any mismatch.
"""

import argparse
import asyncio
import json
import os
import ssl
import sys
import time
from concurrent import futures


def say(obj):
    print(json.dumps(obj) if not isinstance(obj, str) else obj, flush=True)


# ---------------------------------------------------------------- WebSocket


async def ws_server(name):
    import websockets

    async def handler(ws):
        async for message in ws:
            await ws.send(name if message == "who" else message)

    async with websockets.serve(handler, "127.0.0.1", 0, max_size=2**20) as server:
        say(str(server.sockets[0].getsockname()[1]))
        await asyncio.Future()


def client_tls(ca):
    if not ca:
        return None
    ctx = ssl.create_default_context(cafile=ca)
    return ctx


async def echo(ws, count):
    for i in range(count):
        size = (i * 7919) % 65536 + 1
        if i % 2:
            payload = os.urandom(size)
        else:
            payload = ("x%d-" % i) * (size // 8 + 1)
        await ws.send(payload)
        got = await ws.recv()
        if got != payload:
            raise SystemExit("message %d came back different (%d bytes sent)" % (i, len(payload)))


def connect_kwargs(connect, ca, server_name):
    """Connects to `connect` (host:port) whatever host the URL names (it stays the Host)."""
    kwargs = {"max_size": 2**20}
    if connect:
        host, port = connect.rsplit(":", 1)
        kwargs["host"] = host
        kwargs["port"] = int(port)
    if ca:
        kwargs["ssl"] = client_tls(ca)
        kwargs["server_hostname"] = server_name
    return kwargs


async def ws_client(url, count, connect, ca, server_name):
    import websockets

    kwargs = connect_kwargs(connect, ca, server_name)
    async with websockets.connect(url, **kwargs) as ws:
        await ws.send("who")
        who = await ws.recv()
        await echo(ws, count)
    say({"ok": count, "who": who})


async def ws_hold(url, connect, ca, server_name):
    """Keeps one connection and obeys stdin: `who`, `echo N`, `close`."""
    import websockets

    kwargs = connect_kwargs(connect, ca, server_name)
    loop = asyncio.get_running_loop()
    async with websockets.connect(url, **kwargs) as ws:
        say("connected")
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "who":
                await ws.send("who")
                say(await ws.recv())
            elif line.startswith("echo "):
                n = int(line.split()[1])
                await echo(ws, n)
                say("ok %d" % n)
            else:
                break
    say("closed")


# ---------------------------------------------------------------- gRPC


def grpc_server(name, cert, key, health):
    import grpc

    # grpc.health.v1.HealthCheckResponse{status}: field 1, SERVING = 1, NOT_SERVING = 2.
    health_answer = bytes([0x08, 1 if health == "serving" else 2])

    def check(request, context):
        return health_answer

    def unary(request, context):
        return request

    def who(request, context):
        return name.encode()

    def bidi(requests, context):
        for r in requests:
            yield r

    def fail(request, context):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "asked to fail")

    def sleep(request, context):
        time.sleep(int(request.decode()) / 1000)
        return b"slept"

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Who": grpc.unary_unary_rpc_method_handler(who),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Sleep": grpc.unary_unary_rpc_method_handler(sleep),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((
        grpc.method_handlers_generic_handler("test.Echo", handlers),
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check)}
        ),
    ))
    if cert:
        creds = grpc.ssl_server_credentials([(open(key, "rb").read(), open(cert, "rb").read())])
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    say(str(port))
    server.wait_for_termination()


def grpc_client(target, authority, unary_calls, bidi_messages, ca):
    import grpc

    options = [("grpc.default_authority", authority)]
    if ca:
        options.append(("grpc.ssl_target_name_override", authority))
        creds = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
        channel = grpc.secure_channel(target, creds, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    out = {}
    call = lambda m: channel.unary_unary("/test.Echo/" + m)
    out["who"] = call("Who")(b"", timeout=10).decode()
    for i in range(unary_calls):
        payload = os.urandom(i % 2048 + 1)
        if call("Unary")(payload, timeout=10) != payload:
            raise SystemExit("unary call %d: different answer" % i)
    out["unary"] = unary_calls
    sent = [os.urandom(i % 1024 + 1) for i in range(bidi_messages)]
    got = list(channel.stream_stream("/test.Echo/Bidi")(iter(sent), timeout=60))
    if got != sent:
        raise SystemExit("bidi stream: %d messages sent, %d back, equal: %s" % (len(sent), len(got), got == sent))
    out["bidi"] = len(got)
    try:
        call("Fail")(b"x", timeout=10)
        out["fail"] = "OK"
    except grpc.RpcError as e:
        out["fail"] = e.code().name
    try:
        call("Sleep")(b"3000", timeout=0.5)
        out["deadline"] = "OK"
    except grpc.RpcError as e:
        out["deadline"] = e.code().name
    out["slow"] = call("Sleep")(b"1500", timeout=10).decode()
    say(out)


# ---------------------------------------------------------------- HTTPS (HTTP/1.1)


def https_server(name, cert, key):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = json.dumps({"backend": name, "path": self.path, "host": self.headers.get("host", "")}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    say(str(httpd.server_address[1]))
    httpd.serve_forever()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ws-server"); s.add_argument("name")
    s = sub.add_parser("ws-client"); s.add_argument("url"); s.add_argument("count", type=int)
    s.add_argument("--connect"); s.add_argument("--ca"); s.add_argument("--server-name")
    s = sub.add_parser("ws-hold"); s.add_argument("url"); s.add_argument("--connect")
    s.add_argument("--ca"); s.add_argument("--server-name")
    s = sub.add_parser("grpc-server"); s.add_argument("name"); s.add_argument("--cert"); s.add_argument("--key")
    s.add_argument("--health", default="serving", choices=["serving", "not-serving"])
    s = sub.add_parser("grpc-client"); s.add_argument("target"); s.add_argument("authority")
    s.add_argument("--unary", type=int, default=100); s.add_argument("--bidi", type=int, default=1000)
    s.add_argument("--ca")
    s = sub.add_parser("https-server"); s.add_argument("name"); s.add_argument("cert"); s.add_argument("key")
    a = p.parse_args()
    if a.cmd == "ws-server":
        asyncio.run(ws_server(a.name))
    elif a.cmd == "ws-client":
        asyncio.run(ws_client(a.url, a.count, a.connect, a.ca, a.server_name))
    elif a.cmd == "ws-hold":
        asyncio.run(ws_hold(a.url, a.connect, a.ca, a.server_name))
    elif a.cmd == "grpc-server":
        grpc_server(a.name, a.cert, a.key, a.health)
    elif a.cmd == "grpc-client":
        grpc_client(a.target, a.authority, a.unary, a.bidi, a.ca)
    elif a.cmd == "https-server":
        https_server(a.name, a.cert, a.key)


if __name__ == "__main__":
    main()
