"""The baseline of `kvtrade bench serve`'s load test: the HTTP server a user would write around `Forecaster`.

A standard-library ``ThreadingHTTPServer`` (one thread per connection): ``POST /forecast`` takes ``{"prices": [...],
"horizon": h, "num_samples": n}`` and answers with ``Forecaster.predict``'s forecast for that one request (the
next-bar distribution for horizon 1, the sampled paths otherwise), with no batching or cache across requests.
``GET /health`` answers 200 once the model is loaded. With ``--serialize`` a lock runs one forecast at a time.

    python -m hf_kvtrade.benchmarks._naive_server CHECKPOINT --port 8100
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ForecastServer(ThreadingHTTPServer):
    daemon_threads = True
    # The standard library's default listen backlog is 5: hundreds of clients connecting at once would wait for
    # TCP retransmits (a second or more) before the model ever saw them.
    request_queue_size = 1024


def make_handler(forecaster, lock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as HTTP clients expect

        def do_GET(self):
            self._send(200, {"status": "ok"} if self.path == "/health" else {"error": "not found"})

        def do_POST(self):
            if self.path != "/forecast":
                self._send(404, {"error": "not found"})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    forecast = forecaster.predict(
                        request["prices"],
                        horizon=int(request.get("horizon", 1)),
                        num_samples=int(request.get("num_samples", 256)),
                    )
            except (ValueError, KeyError, TypeError) as error:
                self._send(400, {"error": str(error)})
                return
            answer = {
                "last_price": forecast.last_price,
                "prob_up": forecast.prob_up.tolist(),
                "return_quantiles": forecast.return_quantiles.tolist(),
            }
            if forecast.distribution is not None:
                answer["probs"] = forecast.distribution.probs.tolist()
            if forecast.paths is not None:
                answer["paths"] = forecast.paths.tolist()
            self._send(200, answer)

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):
            pass

    return Handler


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--serialize", action="store_true", help="run one forecast at a time")
    args = parser.parse_args(argv)

    from ..forecasting import Forecaster

    lock = threading.Lock() if args.serialize else contextlib.nullcontext()
    server = ForecastServer((args.host, args.port), make_handler(Forecaster.from_pretrained(args.checkpoint), lock))
    print(f"naive Transformers server on http://{args.host}:{args.port}/forecast", flush=True)
    with server, contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


if __name__ == "__main__":
    main()
