"""The model side: run a Python model as a replica of the broker's backend.

    ketch.serve(predict, name="iris", version="1", input_type="float64", broker=...)

``predict`` is a function ``predict(inputs: list) -> list`` (one output per input), an
object with such a ``predict`` method, or a scikit-learn estimator. The replica runs
docs/protocol.md section 5: hello with a stable replica id and the protocol versions it
speaks (section 3), batches computed where they are received (no hand-off between threads
on the query's path) while a heartbeat thread speaks for the replica during a long batch
(so it is never taken for dead), reconnection with backoff when the broker goes silent or
restarts, and a clean drain on SIGTERM or ``stop()``: ``Ready{credits: 0}``, then Goodbye
once the broker's ``Paused`` has come (protocol 2; with a version-1 broker, once no batch
has come for 50 ms). A message of a version it does not speak is answered
``UNSUPPORTED_VERSION``, one of a type it does not know (or not valid from the broker)
``UNKNOWN_MESSAGE``, one that does not decode ``BAD_MESSAGE``.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
import zmq

from ketch import __version__, addresses, errors, tracing
from ketch import protocol as proto
from ketch._status import CONNECTING, DRAINING, READY, StatusFile
from ketch.curve import PeerKeys
from ketch.fingerprint import fingerprint
from ketch.protocol import ErrorCode, Status, limits, multipart

log = structlog.get_logger("ketch.runtime")

DEFAULT_BACKEND = addresses.BACKEND
_DRAIN_QUIET_S = 0.05  # a draining replica says goodbye after this long without a batch
PredictFn = Callable[[list[Any]], list[Any]]
encode_output = proto.encode_output  # (wire dtype, shape, payload) for one model output


def as_predict(model: Any) -> PredictFn:
    """The batch predict function of a function, an object with ``predict``, or an estimator."""
    if hasattr(model, "fit") and hasattr(model, "predict"):
        from ketch.models import SklearnModel

        return SklearnModel(model).predict
    if hasattr(model, "predict") and callable(model.predict):
        return model.predict
    if callable(model):
        return model
    raise TypeError(f"{type(model).__name__} is neither callable nor has a predict method")


class Replica:
    """One replica's connection to the broker; ``run()`` blocks until stopped."""

    def __init__(
        self,
        model: Any,
        *,
        name: str,
        version: str = "1",
        input_type: str = "float64",
        input_shape: list[int] | tuple[int, ...] | None = None,
        broker: str | None = None,
        replica_id: str | None = None,
        credits: int = 2,
        max_batch: int = 0,
        deterministic: bool = True,
        context: zmq.Context | None = None,
        curve: PeerKeys | None = None,
        status_file: str | None = None,
        build_id: str | None = None,
        model_files: Sequence[str | os.PathLike[str]] = (),
    ) -> None:
        self.predict = as_predict(model)
        self.curve = curve or PeerKeys.load()
        self.name = name
        self.version = str(version)
        self.input_dtype = proto.dtype_code(input_type)
        if input_shape is None:
            input_shape = () if self.input_dtype in proto.TEXT_DTYPES else (-1,)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.broker = broker or os.environ.get("KETCH_BACKEND") or DEFAULT_BACKEND
        index = os.environ.get("KETCH_REPLICA_INDEX", str(os.getpid()))
        self.replica_id = replica_id or f"{socket.gethostname()}/{name}/{self.version}/{index}"
        self.credits = credits
        self.max_batch = max_batch
        self.deterministic = deterministic
        # what it serves, announced in its Hello (ketch.fingerprint): the broker's cache is keyed on it
        self.fingerprint = fingerprint(model, build_id=build_id, files=model_files)
        problem = proto.limits.check_hello(self._hello_fields())
        if problem:  # refused here, not by the broker after a hello (nor in a loop)
            raise ValueError(problem)
        self.refusal: errors.RequestError | None = None  # why the broker refused it, if it did
        self._ctx = context or zmq.Context.instance()
        self._stop = threading.Event()
        # the probes' status file ($KETCH_STATUS_FILE), kept by the heartbeat thread
        self._status = StatusFile.from_env(status_file)
        self._welcomed = False
        # The socket belongs to whichever thread holds this lock: the I/O thread, except
        # while it computes a batch, when the heartbeat thread may borrow it (a zmq socket
        # may move between threads across a full memory barrier, which a lock gives).
        self._sock_lock = threading.Lock()
        self._sock: zmq.Socket | None = None
        self._computing_since: float | None = None
        self._last_send = 0.0
        self.heartbeat_s = 1.0
        self.dead_after_s = 5.0
        self.protocol = proto.PROTOCOL_VERSION  # chosen by the broker in its Welcome
        self.batches = 0
        self._failures_seen: set[tuple[str, str]] = set()
        self._failure_logs: list[tuple[int, str, BaseException | None]] = []  # logged after the reply
        # requests of items of one shape, each learnt from a request read the long way as a
        # template of itself (batch id and budgets in the slots), with (dtype, shape, items)
        self._requests = proto.RequestReceiver(total=256)
        # and traced ones (each item a version-00 traceparent), whose matches end with them
        self._traced_requests = proto.RequestReceiver(total=256)
        self._prebuilds = proto.Prebuilds()  # reply templates of other batch sizes
        self._replies = proto.PredictReplySender(self._prebuilds, max_batch)
        self.log = log.bind(model=name, version=self.version, replica=self.replica_id)
        self._tracer = tracing.tracer("replica")  # None: no compute spans (ketch.tracing)

    # ------------------------------------------------------------ public

    def stop(self) -> None:
        """Finish held batches, say goodbye and return from ``run`` (thread- and signal-safe)."""
        self._stop.set()

    def run(self) -> None:
        done = threading.Event()
        beat = threading.Thread(target=self._beat, args=(done,), name=f"ketch-beat-{self.name}", daemon=True)
        beat.start()
        self._sock_lock.acquire()
        try:
            self._loop()
        finally:
            done.set()
            sock, self._sock = self._sock, None
            self._sock_lock.release()
            beat.join(timeout=5)
            self._status.remove()
            if sock is not None:
                sock.close(linger=1000)  # let the Goodbye leave, within a bound

    # ------------------------------------------------------------ heartbeat thread

    def _beat(self, done: threading.Event) -> None:
        """Heartbeat while the I/O thread computes a long batch (it beats itself otherwise)."""
        busy = proto.encode("Heartbeat", {"busy": True})
        while not done.wait(min(self.heartbeat_s / 2, 0.5)):
            self._status.update(DRAINING if self._stop.is_set() else READY if self._welcomed else CONNECTING)
            since = self._computing_since
            if since is None or time.monotonic() - self._last_send < self.heartbeat_s:
                continue
            with self._sock_lock:
                if self._computing_since is not None and self._sock is not None:
                    _send(self._sock, busy)
                    self._last_send = time.monotonic()

    # ------------------------------------------------------------ I/O thread

    def _connect(self) -> zmq.Socket:
        sock = self._ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect_timeout = multipart.CONNECT_TIMEOUT_MS
        if self.curve is not None:
            self.curve.apply(sock)
        sock.connect(self.broker)
        return sock

    def _hello_fields(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "model_version": self.version,
            "input": {"dtype": self.input_dtype, "shape": list(self.input_shape)},
            "sdk": f"python/{__version__}",
            "replica_id": self.replica_id,
            "credits": self.credits,
            "max_batch": self.max_batch,
            "deterministic": self.deterministic,
            "pid": os.getpid(),
            "fingerprint": self.fingerprint,
            "versions": list(proto.PROTOCOL_VERSIONS),
        }

    def _hello(self, sock: zmq.Socket) -> None:
        _send(sock, proto.encode("Hello", self._hello_fields()))

    def _loop(self) -> None:
        sock = self._sock = self._connect()
        self._hello(sock)
        now = time.monotonic()
        last_recv = last_batch = hello_at = self._last_send = now
        welcomed = paused = False
        said_waiting = -1e9
        draining_since: float | None = None
        backoff = 0.1
        heartbeat = proto.encode("Heartbeat", {})
        self._welcomed = False
        while True:
            timeout = min(100 if draining_since is None else 10, int(self.heartbeat_s * 500))
            prebuild = bool(self._prebuilds)
            if sock.poll(0 if prebuild else timeout, zmq.POLLIN):
                for _ in range(64):  # then look at the clock, the stop flag and the heartbeat
                    frames = multipart.recv(sock)
                    last_recv = time.monotonic()
                    action = self._on_message(sock, frames, last_recv)
                    if action == "batch":
                        last_batch = last_recv
                    elif action == "welcome":
                        welcomed, backoff = True, 0.1
                        self._welcomed = True
                        if draining_since is not None:  # a new registration: say it again
                            _send(sock, proto.encode("Ready", {"credits": 0}))
                    elif action == "hello":
                        welcomed = paused = self._welcomed = False
                        self._hello(sock)
                        hello_at = self._last_send = last_recv
                    elif action == "later":  # CONFLICT: the Hello again after the backoff
                        welcomed = paused = False
                        hello_at = last_recv
                        backoff = min(max(backoff * 2, 1.0), 30.0)
                    elif action == "paused":
                        paused = draining_since is not None
                    elif action == "shutdown":
                        self._stop.set()
                    self._welcomed = welcomed
                    if not multipart.waiting(sock):
                        break
            elif prebuild:  # idle: build a reply template before a burst needs it
                self._prebuilds.step()
            now = time.monotonic()
            if self._stop.is_set() and draining_since is None:
                draining_since = now
                self.log.info("replica draining")
                _send(sock, proto.encode("Ready", {"credits": 0}))
                self._last_send = now
            if draining_since is not None and self._drained(paused, draining_since, last_batch, now):
                # batches are computed as they arrive, so none is held here
                _send(sock, proto.encode("Goodbye", {"reason": "drained"}))
                self.log.info(
                    "replica stopped", batches=self.batches, drained_on="paused" if paused else "quiet"
                )
                return
            if not welcomed and now - hello_at > max(backoff, 1.0):
                # no welcome: the broker may be down; keep saying hello, backing off
                self._hello(sock)
                hello_at = self._last_send = now
                backoff = min(backoff * 2, max(backoff, 5.0))
                if now - last_recv > 3 and now - said_waiting > 30:
                    said_waiting = now
                    self.log.warning(
                        "waiting for the broker", broker=self.broker, hint="is it running? ketch broker start"
                    )
            elif welcomed and now - last_recv > self.dead_after_s and not sock.poll(0, zmq.POLLIN):
                self.log.warning("broker silent, reconnecting", silent_s=round(now - last_recv, 2))
                sock.close(linger=0)
                sock = self._sock = self._connect()
                self._hello(sock)
                welcomed = paused = self._welcomed = False
                hello_at = self._last_send = last_recv = now
            elif welcomed and now - self._last_send > self.heartbeat_s:
                _send(sock, heartbeat)
                self._last_send = now

    def _drained(self, paused: bool, since: float, last_batch: float, now: float) -> bool:
        """Whether a draining replica has answered every batch the broker sent it: the
        broker said so (``Paused``, protocol 2), or, from a version-1 broker (or a version-2
        one silent past the dead interval), no batch has come for the quiet spell, which lets
        batches the broker sent before it read Ready(0) arrive."""
        if paused:
            return True
        if self.protocol >= proto.stamp("Paused") and now - since < self.dead_after_s:
            return False
        return now - max(since, last_batch) > _DRAIN_QUIET_S

    def _on_message(self, sock: zmq.Socket, frames: list[zmq.Frame], now: float) -> str:
        header = frames[0].bytes
        found = self._requests.match(header) if self._requests else None
        if found is not None and len(frames) == 1 + found[1][2]:
            values, (dtype, shape, _) = found
            try:
                inputs = [proto.payload_to_value(dtype, shape, f.buffer) for f in frames[1:]]
            except proto.DecodeError:
                inputs = []  # a payload that does not fit: the long way answers for it
            if inputs:  # a batch as learnt: no parse
                reply = self._compute_unlocked(values[0], inputs, values[1:], now)
                self._reply(sock, reply)
                return "batch"
        found = self._traced_requests.match(header) if self._traced_requests else None
        if found is not None and len(frames) == 1 + found[1][2]:
            values, (dtype, shape, n) = found
            try:
                inputs = [proto.payload_to_value(dtype, shape, f.buffer) for f in frames[1:]]
            except proto.DecodeError:
                inputs = []
            if inputs:  # a traced batch as learnt
                parents = [v.decode("latin-1") for v in values[1 + n :]]
                reply = self._compute_traced(values[0], parents, (), inputs, values[1 : 1 + n], now, {})
                self._reply(sock, reply)
                return "batch"
        try:
            version, name, body = proto.decode(header)
        except proto.UnknownMessage as exc:
            if exc.version not in proto.PROTOCOL_VERSIONS:
                return self._unsupported(sock, exc.version, exc.body_type)
            speaks = proto.versions.describe(proto.PROTOCOL_VERSIONS)
            self._answer_error(
                sock, ErrorCode.UNKNOWN_MESSAGE, f"{exc} (this replica speaks protocol {speaks})"
            )
            return ""
        except proto.DecodeError as exc:
            self.log.warning("undecodable message from broker", error=str(exc))
            self._answer_error(sock, ErrorCode.BAD_MESSAGE, f"message does not decode: {exc}")
            return ""
        if version not in proto.PROTOCOL_VERSIONS:  # MUST NOT act on it
            return self._unsupported(sock, version, proto.BODY_CODES[name])
        if name == "PredictRequest":
            try:
                request = proto.read_predict_request(body)
                inputs, bad = self._inputs(request, frames[1:])
            except (proto.DecodeError, errors.ProtocolError) as exc:  # the batch as a whole
                batch_id = proto.read_batch_id(body, name)  # 0 when even that does not decode
                self.log.warning("undecodable batch", batch=batch_id, error=errors.describe(exc))
                reply = [
                    proto.build_predict_reply(
                        batch_id, 0, [], ErrorCode.BAD_MESSAGE, f"batch did not decode: {exc}"[:500]
                    )
                ]
            else:
                if not bad and not request.traceparents and not self._requests.full:
                    self._requests.learn_request(header, body, request)
                elif not bad and request.traceparents and not self._traced_requests.full:
                    self._traced_requests.learn_request(header, body, request, traced=True)
                budgets = list(request.budgets_us)
                if request.traceparents:
                    reply = self._compute_traced(
                        request.batch_id, request.traceparents, request.tracestates, inputs, budgets, now, bad
                    )
                else:
                    reply = self._compute_unlocked(request.batch_id, inputs, budgets, now, bad)
            self._reply(sock, reply)
            return "batch"
        if name == "Welcome":
            try:
                welcome = proto.read_fields(name, body)
            except proto.DecodeError as exc:
                self.log.warning("undecodable message from broker", error=str(exc))
                return ""
            chosen = welcome["version"] or proto.PROTOCOL_VERSION  # a version-1 broker names none
            if chosen not in proto.PROTOCOL_VERSIONS:
                raise errors.UnsupportedVersion(
                    f"the broker chose protocol version {chosen}, which this replica does not speak"
                    f" (it offered {proto.versions.describe(proto.PROTOCOL_VERSIONS)})"
                )
            self.protocol = chosen
            self.heartbeat_s = max(0.01, (welcome["heartbeat_ms"] or 1000) / 1000)
            self.dead_after_s = max(self.heartbeat_s * 2, (welcome["dead_after_ms"] or 5000) / 1000)
            if not self._welcomed:  # a repeated hello is welcomed again: one line per registration
                self.log.info(
                    "replica registered", broker=self.broker, protocol=chosen, fingerprint=self.fingerprint
                )
            return "welcome"
        if name == "Heartbeat":
            return ""
        if name == "Shutdown":
            return "shutdown"
        if name == "Paused":
            return "paused"
        if name == "Error":
            try:
                error = proto.read_fields(name, body)
            except proto.DecodeError as exc:
                self.log.warning("undecodable message from broker", error=str(exc))
                return ""
            return self._on_error(error["code"], error["message"])
        self._answer_error(sock, ErrorCode.UNKNOWN_MESSAGE, f"{name} is not a message from the broker")
        return ""

    def _on_error(self, code: int, message: str) -> str:
        """An Error from the broker, acted on by its code alone (docs/protocol.md section 5):

        - UNSUPPORTED_VERSION: refused for good (``run`` raises);
        - BAD_MESSAGE once welcomed: the broker does not know this connection (it restarted,
          or declared it dead): Hello again; before the Welcome it answers something sent
          before the Hello, which is retried with backoff anyway;
        - CONFLICT in answer to the Hello: not now (the replica id is live elsewhere, or the
          model's live replicas take another input or serve other code): Hello again later;
        - any other code in answer to the Hello: refused (``run`` raises);
        - anything else: logged."""
        if code == ErrorCode.UNSUPPORTED_VERSION:
            raise self._refused(code, message)
        if code == ErrorCode.BAD_MESSAGE:
            if self._welcomed:
                self.log.info("broker does not know this connection: hello again", message=message)
                return "hello"
            return ""
        if not self._welcomed:
            if code == ErrorCode.CONFLICT:
                self.log.warning("hello refused for now: trying again later", message=message)
                return "later"
            raise self._refused(code, message)
        self.log.warning("error from broker", code=errors.code_name(code), message=message)
        return ""

    def _refused(self, code: int, message: str) -> errors.RequestError:
        self.log.error("hello refused", code=errors.code_name(code), message=message)
        self.refusal = errors.raise_for(code, message)
        return self.refusal

    def _unsupported(self, sock: zmq.Socket, version: int, body_type: int) -> str:
        """A message of another protocol version: not acted on; answered, unless an Error."""
        if body_type != proto.BODY_CODES["Error"]:
            speaks = proto.versions.describe(proto.PROTOCOL_VERSIONS)
            text = f"protocol version {version} is not supported (speaks {speaks})"
            self._answer_error(sock, ErrorCode.UNSUPPORTED_VERSION, text)
        return ""

    def _answer_error(self, sock: zmq.Socket, code: int, message: str) -> None:
        self.log.warning("message from broker refused", code=errors.code_name(code), message=message)
        if _send(sock, proto.encode("Error", {"code": code, "message": message[:500]})):
            self._last_send = time.monotonic()

    @staticmethod
    def _inputs(
        request: proto.PredictRequestView, payloads: list[zmq.Frame]
    ) -> tuple[list[Any], dict[int, str]]:
        """The inputs of a batch, from its request and its payload frames, and the items whose
        payload is not a value of their type (their reason): those fail alone (BAD_INPUT)."""
        dtype, ndim, shapes, n = request.dtype, request.ndim, request.shapes, len(request.budgets_us)
        if len(payloads) != n or len(shapes) != ndim * n:
            raise errors.ProtocolError(
                f"batch of {n} items with {len(payloads)} payloads and {len(shapes)} shape entries"
            )
        if dtype not in proto.DTYPE_NAMES:  # the batch as a whole, not each of its items
            raise errors.ProtocolError(f"unknown dtype {dtype}")
        inputs: list[Any] = [None] * n
        bad: dict[int, str] = {}
        for i in range(n):
            try:
                inputs[i] = proto.payload_to_value(
                    dtype, shapes[i * ndim : (i + 1) * ndim], payloads[i].buffer
                )
            except proto.DecodeError as exc:
                bad[i] = f"item {i}: {exc}"
        return inputs, bad

    # ------------------------------------------------------------ compute

    def _reply(self, sock: zmq.Socket, reply: list[Any]) -> None:
        """Send a batch's reply, then log what its model raised: the caller's answer does
        not wait for a traceback to be formatted (a rich renderer takes 100s of ms)."""
        if _send(sock, reply):
            self._last_send = time.monotonic()
        while self._failure_logs:
            batch_id, text, exc = self._failure_logs.pop(0)
            if exc is not None:
                self.log.error("predict raised", batch=batch_id, error=text, exc_info=exc)
            else:
                self.log.warning("predict raised", batch=batch_id, error=text)

    def _model_failed(self, batch_id: int, exc: BaseException) -> str:
        """What the client is told of a model's exception; it is logged once the reply is
        sent (``_reply``), with its traceback the first time a kind is seen, so a model
        failing on every batch does not flood the log."""
        text = model_failure_text(exc)
        kind = (type(exc).__name__, where_in_model(exc))
        first = kind not in self._failures_seen and len(self._failures_seen) < 256
        if first:
            self._failures_seen.add(kind)
        self._failure_logs.append((batch_id, text, exc if first else None))
        return text

    def _compute_unlocked(
        self,
        batch_id: int,
        inputs: list[Any],
        budgets: list[int],
        received: float,
        bad: dict[int, str] | None = None,
    ) -> list[Any]:
        """Compute a batch with the socket lent to the heartbeat thread meanwhile."""
        self._computing_since = received
        self._sock_lock.release()
        try:
            return self._compute(batch_id, inputs, budgets, received, bad or {})
        finally:
            self._sock_lock.acquire()
            self._computing_since = None
            self.batches += 1

    def _compute_traced(
        self,
        batch_id: int,
        traceparents: Sequence[str],
        states: Sequence[str],
        inputs: list[Any],
        budgets: list[int],
        received: float,
        bad: dict[int, str],
    ) -> list[Any]:
        """A batch of traced items computed inside its compute span (``ketch.compute``):
        child of the first traced item's context (the broker's batch span), linked to the
        other traced items' (``ketch.tracing``); without a tracer, computed as any other."""
        t = self._tracer
        if t is None:
            return self._compute_unlocked(batch_id, inputs, budgets, received, bad)
        traced = [(tp, states[i] if i < len(states) else "") for i, tp in enumerate(traceparents) if tp]
        links = []
        for pair in traced[1 : tracing.MAX_LINKS + 1]:
            sc = t.span_context(*pair)
            if sc is not None:
                links.append(t.Link(sc))
        span = t.start(
            "ketch.compute",
            parent=t.context(*traced[0]) if traced else None,
            links=links,
            attributes={
                "ketch.model": self.name,
                "ketch.model_version": self.version,
                "ketch.replica": self.replica_id,
                "ketch.batch_id": batch_id,
                "ketch.batch_size": len(inputs),
            },
        )
        try:
            return self._compute_unlocked(batch_id, inputs, budgets, received, bad)
        finally:
            span.end()

    def _compute(
        self, batch_id: int, inputs: list[Any], budgets: list[int], received: float, bad: dict[int, str]
    ) -> list[Any]:
        """The reply to a batch: ``predict`` on its live items (neither past their budget nor
        in ``bad``, whose payloads did not decode), one output or error per item."""
        n = len(inputs)
        waited_us = (time.monotonic() - received) * 1e6
        # the common case: no deadline passed, every payload decoded
        every = not bad and (not budgets or min(budgets) > waited_us)
        live = list(range(n)) if every else [i for i in range(n) if budgets[i] > waited_us and i not in bad]
        results: list[Any] = [None] * n
        t0 = time.perf_counter()
        failure = ""
        if live:
            try:
                outs = self.predict(inputs if every else [inputs[i] for i in live])
                if not isinstance(outs, list):
                    outs = as_outputs(outs, len(live))
                if len(outs) != len(live):
                    failure = (
                        f"ValueError: predict returned {len(outs)} outputs for {len(live)} inputs "
                        "(it must return one output per input)"
                    )
                elif every:
                    results = outs
                else:
                    for i, out in zip(live, outs, strict=True):
                        results[i] = out
            except OutputsNotAList as exc:
                failure = str(exc)
            except Exception as exc:
                failure = self._model_failed(batch_id, exc)
        # at least 1 us: a zero is left out of the table and would miss the template below;
        # a uint32, it saturates (a batch of over 71 minutes)
        compute_us = min(limits.U32_MAX, max(1, int((time.perf_counter() - t0) * 1e6)))
        if failure:
            if failure.startswith("ValueError: predict returned") or failure.startswith("TypeError: predict"):
                self.log.warning("predict failed", batch=batch_id, error=failure)
            if not bad:
                return [proto.build_predict_reply(batch_id, compute_us, [], ErrorCode.MODEL_ERROR, failure)]
            failed = (Status.ERROR, None, (), ErrorCode.MODEL_ERROR, failure)  # bad items keep their own
            metas = [
                (Status.ERROR, None, (), ErrorCode.BAD_INPUT, bad[i][:500]) if i in bad else failed
                for i in range(n)
            ]
            return [proto.build_predict_reply(batch_id, compute_us, metas), *[b""] * n]
        if every and batch_id:
            try:
                encoded = [encode_output(out) for out in results]
            except (TypeError, ValueError):
                encoded = []  # the long way below says which output failed
            if encoded:
                dtype, shape, _ = encoded[0]
                if all(e[0] == dtype and e[1] == shape for e in encoded):  # from a prebuilt template
                    template = self._replies.template(dtype, tuple(shape), n)
                    return [template.render(batch_id, compute_us), *[e[2] for e in encoded]]
        live_set = set(live)
        metas, payloads = [], []
        for i in range(n):
            if i in bad:
                metas.append((Status.ERROR, None, (), ErrorCode.BAD_INPUT, bad[i][:500]))
                payloads.append(b"")
                continue
            if i not in live_set:
                metas.append((Status.ERROR, None, (), ErrorCode.DEADLINE, "deadline passed before compute"))
                payloads.append(b"")
                continue
            try:
                dtype, shape, payload = encode_output(results[i])
            except (TypeError, ValueError) as exc:
                metas.append((Status.ERROR, None, (), ErrorCode.MODEL_ERROR, errors.describe(exc)))
                payloads.append(b"")
                continue
            metas.append((Status.OK, dtype, shape, 0, ""))
            payloads.append(payload)
        first = metas[0] if metas else (Status.ERROR,)
        if (
            batch_id
            and first[0] == Status.OK
            and all(m[0] == Status.OK and m[1] == first[1] and m[2] == first[2] for m in metas)
        ):  # the common case: every output OK and of one type, from a prebuilt template
            header = self._replies.template(first[1], tuple(first[2]), n).render(batch_id, compute_us)
        else:
            header = proto.build_predict_reply(batch_id, compute_us, metas)
        return [header, *payloads]


class OutputsNotAList(Exception):
    """predict returned something that is not one output per input."""


def as_outputs(outs: Any, n: int) -> list[Any]:
    """``predict``'s result as a list of outputs, one per input: a list, a tuple or an array
    with one row per input. Anything else raises ``OutputsNotAList`` saying what to return."""
    if isinstance(outs, tuple) or (hasattr(outs, "ndim") and getattr(outs, "ndim", 0) >= 1):
        return list(outs)
    raise OutputsNotAList(
        f"TypeError: predict returned {type(outs).__name__} {str(outs)[:40]!r} for a batch of {n}: it "
        "takes a list of inputs (one per query) and returns a list of outputs, one per input"
    )


PER_ITEM_HINT = (
    " (hint: predict receives a list of inputs, one per query, and returns a list of outputs; "
    "for a function of one input write: def predict(inputs): return [f(x) for x in inputs])"
)
# what a function of one input says when it is given the batch (a list of arrays)
_LIST_WORDS = ("'list'", "list object", "list indices", "sequence", "inhomogeneous", "0-dimensional",
               "size-1 array", "length-1 array", "values to unpack", "shapes (")  # fmt: skip


def where_in_model(exc: BaseException) -> str:
    """``file.py:line`` of the innermost frame of the traceback outside Ketch and the
    libraries it runs on ("" when there is none)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    skip = (os.sep + "ketch" + os.sep, os.sep + "site-packages" + os.sep, os.sep + "dist-packages" + os.sep)
    mine = [f for f in frames if not any(s in f.filename for s in skip) and not f.filename.startswith("<")]
    if not mine:
        return ""
    f = mine[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"


def model_failure_text(exc: BaseException) -> str:
    """What the client is told of an exception in the model: its class, its message, where in
    the model's code it was raised, and a hint when the model seems to take one input."""
    text = errors.describe(exc)
    at = where_in_model(exc)
    if at:
        text += f" (at {at})"
    if isinstance(exc, TypeError | AttributeError | ValueError | IndexError) and any(
        w in str(exc) for w in _LIST_WORDS
    ):
        text += PER_ITEM_HINT
    return text


def _send(sock: zmq.Socket, message: bytes | list[Any]) -> bool:
    """Send without ever blocking: with no usable connection (broker down, handshake
    refused) the message is dropped; hellos and heartbeats are repeated, and the broker
    re-queues work whose results never arrive."""
    try:
        if isinstance(message, list):
            multipart.send(sock, message, multipart.NOBLOCK)
        else:
            sock.send(message, zmq.NOBLOCK)
        return True
    except zmq.Again:
        log.debug("send dropped: no connection to the broker")
        return False


def serve(model: Any, *, name: str, handle_signals: bool = True, **kw: Any) -> None:
    """Run ``model`` as a replica until SIGTERM/SIGINT (or the broker's Shutdown); traced
    when the OpenTelemetry variables say so (``ketch.tracing.setup``)."""
    tracing.setup("ketch-replica")
    replica = Replica(model, name=name, **kw)
    # the model's objects (often a large heap) move out of the collector's sight, so a
    # full collection does not walk them while a batch waits
    gc.freeze()
    if handle_signals and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: replica.stop())
    try:
        replica.run()
    finally:
        tracing.shutdown()
