"""A TCP sink for traffic tests and benches: run `python -c SINK ADDR HOLD_S PORT...` inside a
namespace; it accepts on every port, reads each connection until the client closes, prints
"ready" once listening, and exits after HOLD_S seconds (bounded, as every lab process)."""

SINK = """
import socket, sys, threading
def drain(c):
    while c.recv(65536):
        pass
    c.close()
def serve(srv):
    while True:
        c, _ = srv.accept()
        threading.Thread(target=drain, args=(c,), daemon=True).start()
for p in sys.argv[3:]:
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((sys.argv[1], int(p))); srv.listen(64)
    threading.Thread(target=serve, args=(srv,), daemon=True).start()
print("ready", flush=True)
threading.Event().wait(float(sys.argv[2]))
"""
