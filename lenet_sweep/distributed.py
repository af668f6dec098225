"""Sweeps across machines on KerasTuner's own chief/worker mode, with what that mode lacks.

KerasTuner's chief serves its oracle over gRPC and workers ask it for trials (`KERASTUNER_TUNER_ID`,
`KERASTUNER_ORACLE_IP`, `KERASTUNER_ORACLE_PORT`). Read from its 1.4 source (../shared/PITFALLS.md,
tests/test_distributed.py pins each): a dead worker's trial stays running for ever, a restarted chief hands
running trials out again, an idle worker asks again at once, two chiefs can share a port, and a worker's
calls do not say who sends them. This module keeps KerasTuner's oracle and servicer and adds:

- `WorkerOracle`: KerasTuner's `OracleClient` whose calls carry the worker's id (gRPC metadata), which
  sleeps when the chief says IDLE, and which waits `chief_wait` for an unreachable chief.
- `Heartbeat`: a Keras callback; at each epoch's end and every lease/4 s within one it tells the chief the
  trial is alive, and it stops a trial whose lease the chief has given to another worker (`LeaseLost`).
- `ChiefServicer` + `serve`: leases (a trial whose worker went quiet for `lease_seconds` goes back to the
  retry queue for the next worker), end reports from a worker that lost its lease ignored, STOPPED held back
  as IDLE while a trial is still out (it may come back), an exit once every trial is in, one chief per port.
- `restore_ongoing`: a restarted chief gives running trials back to their workers instead of queueing them.

The gRPC port is plaintext and unauthenticated (docs/DISTRIBUTED.md): loopback, a private network or a tunnel.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import grpc
import keras
from keras_tuner.src import protos
from keras_tuner.src.distribute.oracle_chief import OracleServicer
from keras_tuner.src.distribute.oracle_client import OracleClient
from keras_tuner.src.engine import oracle as oracle_module
from keras_tuner.src.engine import trial as trial_module

from lenet_sweep.errors import UserError

WORKER_KEY = "x-lenet-sweep-worker"  # gRPC metadata: the calling worker's id
HEARTBEAT_KEY = "x-lenet-sweep-heartbeat"  # gRPC metadata on a GetTrial that is a heartbeat
IDLE_SLEEP = (0.5, 10.0)  # seconds an idle worker waits before asking again: first, at most (doubling)
Status = trial_module.TrialStatus


def address(chief: str) -> tuple[str, int]:
    """`HOST:PORT` (sweep.chief) as (host, port); a UserError saying what is wrong otherwise."""
    host, _, port = chief.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"sweep.chief={chief!r}: give HOST:PORT, e.g. sweep.chief=127.0.0.1:8000")
    return host.strip("[]"), int(port)


def check_role(settings: Any) -> None:
    """The role settings (`cfg.sweep`) make sense together; a UserError naming the key otherwise."""
    if str(settings.role) == "local":
        return
    address(settings.chief)
    if str(settings.role) == "worker":
        worker = settings.worker_id
        if not worker:
            raise UserError("sweep.role=worker needs sweep.worker_id=NAME (unique per live worker)")
        if "chief" in worker:
            raise UserError(f"sweep.worker_id={worker!r}: KerasTuner takes any id containing 'chief' for the chief")
        if settings.overwrite:
            raise UserError("sweep.overwrite=true on a worker would delete the chief's shared sweep.dir: drop it")


@contextmanager
def kerastuner_role(role: str, chief: str, worker_id: Optional[str]) -> Iterator[None]:
    """KerasTuner's role variables for the life of the block (none for a local sweep), restored after."""
    keys = ("KERASTUNER_TUNER_ID", "KERASTUNER_ORACLE_IP", "KERASTUNER_ORACLE_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    if role != "local":
        host, port = address(chief)
        os.environ.update({keys[0]: "chief" if role == "chief" else str(worker_id), keys[1]: host, keys[2]: str(port)})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- the oracle's lock -------------------------------------------------------------------------


@contextmanager
def oracle_lock(oracle) -> Iterator[None]:
    """KerasTuner's per-oracle lock (its `synchronized`), released also when the body raises.

    KerasTuner's own decorator has no try/finally: an exception inside an oracle method leaves the lock
    held and the chief's next caller from another thread waits for ever.
    """
    name = threading.current_thread().name
    owned = oracle_module.THREADS[oracle] == name
    if not owned:
        oracle_module.LOCKS[oracle].acquire()
        oracle_module.THREADS[oracle] = name
    try:
        yield
    finally:
        if not owned:
            oracle_module.THREADS[oracle] = None
            oracle_module.LOCKS[oracle].release()


# ---- chief -------------------------------------------------------------------------------------


class Leases:
    """When the chief last heard from each worker; a worker quiet for `seconds` has lost its trial."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.seen: dict[str, float] = {}

    def beat(self, worker: str) -> None:
        self.seen[worker] = time.monotonic()

    def lapsed(self, worker: str) -> bool:
        return time.monotonic() - self.seen.get(worker, float("-inf")) > self.seconds


def _caller(context) -> str:
    return dict(context.invocation_metadata() or ()).get(WORKER_KEY, "")


def _owner(oracle, trial_id: str) -> Optional[str]:
    """The worker running trial `trial_id` now, or None."""
    return next((w for w, t in oracle.ongoing_trials.items() if t.trial_id == trial_id), None)


class ChiefServicer(OracleServicer):
    """KerasTuner's oracle servicer with leases: every call renews its worker's lease, and a worker's
    reports on a trial it no longer holds are ignored (the trial is another worker's now)."""

    def __init__(self, oracle, leases: Leases, on_end: Callable[[Any, str], None], print_fn=None):
        super().__init__(oracle)
        self.leases, self.on_end, self.print_fn = leases, on_end, print_fn
        self.busy_seconds = 0.0  # time spent inside calls: the chief's overhead
        self.calls = 0
        # A restarted chief does not know the idle workers yet (KerasTuner saves no worker ids): it
        # serves at least a lease before it may end, so each can ask and be told.
        self.not_before = 0.0

    @contextmanager
    def _call(self, worker: str) -> Iterator[None]:
        started = time.perf_counter()
        if worker:
            self.leases.beat(worker)
        try:
            with oracle_lock(self.oracle):
                yield
        finally:
            self.busy_seconds += time.perf_counter() - started
            self.calls += 1

    def _say(self, text: str) -> None:
        if self.print_fn:
            self.print_fn(text)

    def CreateTrial(self, request, context):
        worker = request.tuner_id
        with self._call(worker):
            trial = self.oracle.create_trial(worker)
            if trial.status == Status.STOPPED:
                if self.oracle.ongoing_trials or self.oracle._retry_queue:
                    # A trial still out may come back (its worker may die): keep this worker waiting.
                    self.oracle.tuner_ids.add(worker)  # KerasTuner forgot it when it said STOPPED
                    trial = trial_module.Trial(self.oracle.get_space(), status=Status.IDLE)
                else:
                    self.stop_triggered = True
            return protos.get_service().CreateTrialResponse(trial=trial.to_proto())

    def UpdateTrial(self, request, context):
        worker = _caller(context)
        with self._call(worker):
            if worker and _owner(self.oracle, request.trial_id) != worker:
                return protos.get_service().UpdateTrialResponse(trial=self.oracle.trials[request.trial_id].to_proto())
            trial = self.oracle.update_trial(request.trial_id, request.metrics, step=request.step)
            return protos.get_service().UpdateTrialResponse(trial=trial.to_proto())

    def EndTrial(self, request, context):
        worker = _caller(context)
        trial = trial_module.Trial.from_proto(request.trial)
        with self._call(worker):
            owner = _owner(self.oracle, trial.trial_id)
            if worker and owner != worker:
                self._say(
                    f"ignored the end of trial {trial.trial_id} from worker {worker}: its lease ran out and "
                    f"the trial went to {owner or 'another worker'}"
                )
                return protos.get_service().EndTrialResponse()
            self.oracle.end_trial(trial)
            # KerasTuner saves before it drops the trial from the running ones: save again, or a chief
            # killed now would give the ended trial back to its worker on restart.
            self.oracle.save()
            try:
                self.on_end(self.oracle.trials[trial.trial_id], worker)
            except Exception as err:  # a reporting hiccup (MLflow) must not fail the worker's call
                self._say(f"trial {trial.trial_id} ended; reporting it failed: {type(err).__name__}: {err}")
            return protos.get_service().EndTrialResponse()

    def GetTrial(self, request, context):
        worker = _caller(context)
        with self._call(worker):
            trial = self.oracle.get_trial(request.trial_id)
            proto = trial.to_proto()
            heartbeat = dict(context.invocation_metadata() or ()).get(HEARTBEAT_KEY)
            if heartbeat and _owner(self.oracle, request.trial_id) != worker:
                proto.status = Status.to_proto(Status.STOPPED)  # the lease is lost: stop training it
            return protos.get_service().GetTrialResponse(trial=proto)


def take_back_lapsed(oracle, leases: Leases) -> list[tuple[str, str]]:
    """Trials whose worker went quiet for a lease: back to KerasTuner's retry queue, which hands them to
    the next worker that asks. Returns (worker, trial id) of each."""
    with oracle_lock(oracle):
        lapsed = [(w, t.trial_id) for w, t in oracle.ongoing_trials.items() if leases.lapsed(w)]
        for worker, trial_id in lapsed:
            oracle.ongoing_trials.pop(worker)
            oracle.tuner_ids.discard(worker)
            oracle._retry_queue.append(trial_id)
        if lapsed:
            oracle.save()
    return lapsed


def restore_ongoing(oracle, state_file: Path, leases: Leases) -> dict[str, str]:
    """After a chief restart: the trials the saved state had running go back to their workers (each with
    a fresh lease) instead of into the retry queue, where KerasTuner's `reload` put them and from where
    they would be handed out a second time. Returns worker -> trial id."""
    saved = json.loads(state_file.read_text()).get("ongoing_trials", {}) if state_file.exists() else {}
    with oracle_lock(oracle):
        for worker, trial_id in saved.items():
            if trial_id in oracle._retry_queue and trial_id in oracle.trials and trial_id not in oracle.end_order:
                oracle._retry_queue.remove(trial_id)
                oracle.trials[trial_id].status = Status.RUNNING
                oracle.ongoing_trials[worker] = oracle.trials[trial_id]
                oracle.tuner_ids.add(worker)
                leases.beat(worker)
    return saved


def _finished(oracle, servicer: ChiefServicer, leases: Leases) -> bool:
    """The search is over, no trial is out, and every worker still alive has been told so."""
    if time.monotonic() < servicer.not_before:
        return False
    with oracle_lock(oracle):
        for worker in [w for w in oracle.tuner_ids if leases.lapsed(w)]:
            oracle.tuner_ids.discard(worker)  # died between trials: it will not ask again
        return servicer.stop_triggered and not oracle.ongoing_trials and not oracle.tuner_ids


def bind(host: str, port: int) -> grpc.Server:
    """A one-thread gRPC server bound to host:port, not yet serving; a UserError if the port is taken.

    Bound before the chief touches its state or MLflow, so a second chief is refused before it changes
    anything. gRPC sets SO_REUSEPORT by default, so a second chief would bind the same port and split the
    workers between the two: it is switched off.
    """
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), options=[("grpc.so_reuseport", 0)])
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise UserError(
            f"cannot listen on {host}:{port} (sweep.chief): the port is taken, by another chief or another "
            "program. Stop it, or give this sweep another sweep.chief=HOST:PORT"
        )
    return server


def serve(
    server: grpc.Server,
    servicer: ChiefServicer,
    on_lapsed: Callable[[str, str], None],
    poll_seconds: float = 1.0,
) -> None:
    """Serve the oracle on `server` (from `bind`) until the search is over and the live workers know it;
    take back the trials of workers that went quiet."""
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    server.start()
    try:
        while not _finished(servicer.oracle, servicer, servicer.leases):
            time.sleep(poll_seconds)
            for worker, trial_id in take_back_lapsed(servicer.oracle, servicer.leases):
                try:
                    on_lapsed(worker, trial_id)
                except Exception as err:  # the trial is back in the queue; only its MLflow note failed
                    servicer._say(f"trial {trial_id}: could not end worker {worker}'s run: {type(err).__name__}: {err}")
    finally:
        server.stop(grace=2).wait()


# ---- worker ------------------------------------------------------------------------------------


_FIELDS = ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")


class _Details(collections.namedtuple("_Details", _FIELDS), grpc.ClientCallDetails):
    pass


class _Stamp(grpc.UnaryUnaryClientInterceptor):
    """Adds the worker's id to every call and caps KerasTuner's 60-minute wait at `wait_seconds`."""

    def __init__(self, worker_id: str, wait_seconds: float):
        self.worker_id, self.wait_seconds = worker_id, wait_seconds

    def intercept_unary_unary(self, continuation, details, request):
        metadata = [*(details.metadata or ()), (WORKER_KEY, self.worker_id)]
        timeout = min(details.timeout or self.wait_seconds, self.wait_seconds)
        stamped = _Details(
            details.method, timeout, metadata, details.credentials, details.wait_for_ready, details.compression
        )
        return continuation(stamped, request)


class WorkerOracle(OracleClient):
    """KerasTuner's client of the chief's oracle, stamped with the worker's id, sleeping when IDLE, and
    retrying a report the chief could not take because it went away mid-call (restarting)."""

    def __init__(self, oracle, chief: str, worker_id: str, wait_seconds: float, lease_seconds: float = 120.0):
        # OracleClient.__init__ opens its own unstamped channel from the environment: set up the same
        # attributes on a stamped one instead.
        self._oracle = oracle
        channel = grpc.intercept_channel(grpc.insecure_channel(chief), _Stamp(worker_id, wait_seconds))
        self.stub = protos.get_service_grpc().OracleStub(channel)
        self.tuner_id = worker_id
        self.multi_worker = False
        self.should_report = True
        self.wait_seconds = wait_seconds
        # An idle worker asks at least every lease/4 s, so the chief never takes it for dead.
        self.idle_max = min(IDLE_SLEEP[1], max(lease_seconds / 4, IDLE_SLEEP[0]))
        self._idle = 0

    def _retrying(self, call: Callable[[], Any]) -> Any:
        """`call()`, again every 2 s while the chief is unavailable (a restart), for up to `wait_seconds`.

        Without it KerasTuner's trial loop takes the error for the trial's own and records it failed."""
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                return call()
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def create_trial(self, tuner_id):
        trial = super().create_trial(tuner_id)
        if trial.status == Status.IDLE:  # KerasTuner asks again at once: a busy loop, unless we wait
            time.sleep(min(IDLE_SLEEP[0] * 2**self._idle, self.idle_max))
            self._idle += 1
        else:
            self._idle = 0
        return trial

    def update_trial(self, trial_id, metrics, step=0):
        return self._retrying(lambda: super(WorkerOracle, self).update_trial(trial_id, metrics, step=step))

    def get_trial(self, trial_id):
        return self._retrying(lambda: super(WorkerOracle, self).get_trial(trial_id))

    def end_trial(self, trial):
        return self._retrying(lambda: super(WorkerOracle, self).end_trial(trial))

    def holds(self, trial_id: str, timeout: float, definite: bool = False) -> bool:
        """A heartbeat: False only when the chief says trial `trial_id` is no longer this worker's.

        An unreachable chief counts as yes (a restarted chief gives running trials back), unless
        `definite`: then it waits for the chief's answer (up to `wait_seconds`), as before a trial's
        run is closed FINISHED."""
        try:
            response = self.stub.GetTrial(
                protos.get_service().GetTrialRequest(trial_id=trial_id),
                metadata=[(HEARTBEAT_KEY, "1")],
                timeout=self.wait_seconds if definite else timeout,
                wait_for_ready=definite,
            )
        except grpc.RpcError:
            return True
        return trial_module.Trial.from_proto(response.trial).status != Status.STOPPED


class LeaseLost(RuntimeError):
    """The chief gave this worker's trial to another worker (this one was quiet for a lease)."""


class Heartbeat(keras.callbacks.Callback):
    """Tells the chief the trial is alive, from a thread so that a slow or restarting chief never stalls
    training: every lease/4 s from `start` (the trial's start: its setup, decoding, model build), and at
    each epoch's end. Once training runs, only progress counts: a trainer stuck for a lease stops beating
    and loses its trial. Raises `LeaseLost` at the next batch once the chief has given the trial away.
    `stop` ends the thread (call it in a `finally`: Keras skips `on_train_end` when fit raises)."""

    def __init__(self, oracle: WorkerOracle, trial_id: str, lease_seconds: float):
        super().__init__()
        self.oracle, self.trial_id, self.lease = oracle, trial_id, lease_seconds
        self.interval = max(lease_seconds / 4, 0.5)
        self.progress = time.monotonic()
        self.training = False
        self.lost = False
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> Heartbeat:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="lenet-sweep-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            stuck = self.training and time.monotonic() - self.progress > self.lease
            if self._stop.is_set() or stuck:
                continue
            if not self.oracle.holds(self.trial_id, timeout=self.interval):
                self.lost = True

    def _progressed(self, *_args, **_kwargs) -> None:
        self.progress = time.monotonic()
        if self.lost:
            raise LeaseLost(
                f"trial {self.trial_id}: the chief gave it to another worker (no heartbeat from this one "
                f"for {self.lease:g} s, sweep.lease_seconds)"
            )

    on_train_batch_end = on_test_batch_end = _progressed

    def on_train_begin(self, logs=None):
        self.training = True
        self._progressed()

    def on_epoch_end(self, epoch, logs=None):
        self._progressed()
        self._wake.set()  # one heartbeat per epoch, now

    def on_train_end(self, logs=None):
        self.training = False
