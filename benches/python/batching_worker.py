#!/usr/bin/env python3
"""A Python scoring worker with dynamic batching, for the end-to-end benchmark to compare with.

It speaks batchscore's message contract (docs/contract.md) for one model: consumes jobs with a
prefetch, gathers them for up to --max-delay-ms or --max-batch-rows rows, scores their rows in one
ONNX Runtime run, publishes one result per job (to its reply_to, else --results-queue) with
publisher confirms, and acknowledges each job only after the broker confirmed its result.

    python3 benches/python/batching_worker.py --queue scoring.jobs \\
        --model models/credit_default/1/model.onnx --features-config models/credit_default/config.yaml

Prints `ready` on stdout once consuming; stops on SIGTERM or SIGINT after finishing the jobs it
holds. Declares nothing unless --declare is given: the jobs queue must exist.

Differences from batchscore, none of which the benchmark exercises: results are published without
`mandatory` (a missing reply queue drops the result instead of rerouting it), failed jobs are not
dead-lettered, deadlines are not enforced, a job larger than --max-batch-rows runs alone in one
run instead of being split, and floats are written as the shortest decimal of the float64 value.
"""

import argparse
import collections
import hashlib
import itertools
import json
import logging
import signal
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pika
import yaml

log = logging.getLogger("python-worker")

MAX_JOB_ID_CHARS = 256
SHUTDOWN_TIMEOUT_S = 30.0


class JobError(Exception):
    """A job that cannot be scored: answered with an error result."""

    def __init__(self, code, message, job_id=None, model=None, model_version=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.job_id = job_id
        self.model = model
        self.model_version = model_version


class Model:
    """One ONNX model version, its feature names and the outputs to publish."""

    def __init__(self, path, config_path, name, version, intra_threads):
        path = Path(path)
        self.name = name or (path.parent.parent.name if path.parent.name.isdigit() else path.stem)
        self.version = str(version or (int(path.parent.name) if path.parent.name.isdigit() else 1))
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        options = ort.SessionOptions()
        options.inter_op_num_threads = 1
        if intra_threads > 0:
            options.intra_op_num_threads = intra_threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise SystemExit(f"{path}: expected one input, found {len(inputs)}")
        self.input_name = inputs[0].name
        config = {}
        if config_path:
            config = yaml.safe_load(Path(config_path).read_text()) or {}
        self.features = config.get("features")
        self.feature_index = {f: i for i, f in enumerate(self.features or [])}
        width = inputs[0].shape[1] if len(inputs[0].shape) == 2 else None
        self.n_features = width if isinstance(width, int) else len(self.features or [])
        if not self.n_features:
            raise SystemExit(f"{path}: the input width is open; pass --features-config with features")
        if self.features is not None and len(self.features) != self.n_features:
            raise SystemExit(f"{config_path} lists {len(self.features)} features; the model has {self.n_features}")
        available = [o.name for o in self.session.get_outputs()]
        wanted = config.get("outputs") or available
        missing = [o for o in wanted if o not in available]
        if missing:
            raise SystemExit(f"{config_path} publishes {missing}, which the model does not have ({available})")
        self.outputs = [o for o in available if o in wanted]

    def run(self, matrix):
        return self.session.run(self.outputs, {self.input_name: matrix})


def decode(body, properties, model):
    """Body and properties → (job_id, float32 matrix [rows, n_features]), or raises JobError."""
    fallback_id = properties.message_id or None
    content_type = (properties.content_type or "").split(";")[0].strip()
    if content_type and content_type.lower() != "application/json":
        raise JobError("invalid_input", f"content_type {properties.content_type!r} is not supported", fallback_id)
    try:
        job = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise JobError("invalid_json", f"job body is not JSON: {e}", fallback_id) from None
    if not isinstance(job, dict):
        raise JobError("invalid_json", "job body must be a JSON object", fallback_id)
    job_id = job.get("job_id") or fallback_id
    if not isinstance(job_id, str) or not 0 < len(job_id) <= MAX_JOB_ID_CHARS:
        raise JobError("invalid_input", f"job_id must be a string of 1 to {MAX_JOB_ID_CHARS} characters", fallback_id)
    name = job.get("model")
    fail = lambda code, message: JobError(code, message, job_id, name if isinstance(name, str) else None)  # noqa: E731
    if name != model.name:
        raise fail("unknown_model", f"model {name!r} is not served here (available: {model.name})")
    pinned = job.get("model_version")
    if pinned is not None and str(pinned) != model.version:
        raise fail("unknown_model", f"model {name!r} has no version {pinned} (available: {model.version})")
    rows, records = job.get("rows"), job.get("records")
    if (rows is None) == (records is None):
        raise fail("invalid_input", "job must have exactly one of rows and records")
    if rows is not None:
        if not isinstance(rows, list) or not rows:
            raise fail("invalid_input", "rows must be a non-empty array of arrays of numbers")
        try:
            matrix = np.asarray(rows, dtype=np.float32)
        except (TypeError, ValueError) as e:
            raise fail("invalid_input", f"rows are not arrays of numbers of one length: {e}") from None
        if matrix.ndim != 2 or matrix.shape[1] != model.n_features:
            raise fail("invalid_input", f"rows must have {model.n_features} values each")
    else:
        if model.features is None:
            raise fail("invalid_input", f"model {model.name} has no feature names; send rows instead of records")
        if not isinstance(records, list) or not records:
            raise fail("invalid_input", "records must be a non-empty array of objects")
        matrix = np.full((len(records), model.n_features), np.nan, dtype=np.float32)
        for i, record in enumerate(records):
            if not isinstance(record, dict):
                raise fail("invalid_input", f"records[{i}] is not an object")
            for feature, value in record.items():
                column = model.feature_index.get(feature)
                if column is None:
                    raise fail("invalid_input", f"records[{i}] has {feature!r}, which is not a feature")
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise fail("invalid_input", f"records[{i}].{feature} is not a number")
                matrix[i, column] = value
            if np.isnan(matrix[i]).any():
                missing = model.features[int(np.flatnonzero(np.isnan(matrix[i]))[0])]
                raise fail("invalid_input", f"records[{i}] has no value for feature {missing!r}")
    if not np.isfinite(matrix).all():
        raise fail("invalid_input", "a value is outside the float32 range")
    return job_id, matrix


def json_values(output):
    """A slice of one output as JSON-ready values; NaN and infinities become null."""
    if isinstance(output, np.ndarray):
        if output.dtype.kind == "f" and not np.isfinite(output).all():
            return np.where(np.isfinite(output), output, None).tolist()
        return output.tolist()
    return list(output)


def ms(seconds):
    return round(seconds * 1e3, 3)


class Job:
    __slots__ = ("tag", "properties", "job_id", "matrix", "received_at")

    def __init__(self, tag, properties, job_id, matrix, received_at):
        self.tag = tag
        self.properties = properties
        self.job_id = job_id
        self.matrix = matrix
        self.received_at = received_at


class Worker:
    """SelectConnection event loop: consume → gather → run → publish with confirms → ack."""

    def __init__(self, args, per_message):
        self.args = args
        self.per_message = per_message
        self.model = Model(args.model, args.features_config, args.model_name, args.model_version, args.intra_threads)
        self.max_delay_s = args.max_delay_ms / 1000.0
        self.pending = collections.deque()
        self.pending_rows = 0
        self.timer = None
        self.unconfirmed = {}  # publish sequence number → job delivery tag
        self.settled = set()  # job delivery tags above `acked` whose result the broker confirmed or refused
        self.acked = 0  # every job delivery tag up to this one is settled
        self.published = 0
        self.consumer_tag = None
        self.consume_channel = None
        self.publish_channel = None
        self.stopping = False
        self.cancelled = False
        self.failed = False
        self.connection = pika.SelectConnection(
            pika.URLParameters(args.url),
            on_open_callback=self.on_connection_open,
            on_open_error_callback=self.on_connection_error,
            on_close_callback=self.on_connection_closed,
        )

    def run(self):
        self.connection.ioloop.start()
        return 1 if self.failed else 0

    # Connection and channels.

    def on_connection_open(self, connection):
        connection.channel(on_open_callback=self.on_consume_channel)

    def on_connection_error(self, _connection, error):
        log.error("cannot connect to RabbitMQ: %s", error)
        self.failed = True
        self.connection.ioloop.stop()

    def on_connection_closed(self, _connection, reason):
        if not self.stopping:
            log.error("connection closed: %s", reason)
            self.failed = True
        self.connection.ioloop.stop()

    def on_channel_closed(self, channel, reason):
        if not self.stopping:
            log.error("channel %s closed: %s", channel.channel_number, reason)
            self.failed = True
            self.stopping = True
        if self.connection.is_open:
            self.connection.close()

    def on_consume_channel(self, channel):
        self.consume_channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        channel.basic_qos(prefetch_count=self.args.prefetch, callback=self.on_qos)

    def on_qos(self, _frame):
        if self.args.declare:
            self.consume_channel.queue_declare(self.args.queue, durable=True, callback=self.on_queue)
        else:
            self.consume_channel.queue_declare(self.args.queue, passive=True, callback=self.on_queue)

    def on_queue(self, _frame):
        self.connection.channel(on_open_callback=self.on_publish_channel)

    def on_publish_channel(self, channel):
        self.publish_channel = channel
        channel.add_on_close_callback(self.on_channel_closed)
        channel.confirm_delivery(ack_nack_callback=self.on_confirm, callback=self.on_confirm_mode)

    def on_confirm_mode(self, _frame):
        self.consumer_tag = self.consume_channel.basic_consume(
            self.args.queue, self.on_message, auto_ack=False, callback=self.on_consuming
        )

    def on_consuming(self, _frame):
        log.info("consuming %s with model %s v%s", self.args.queue, self.model.name, self.model.version)
        sys.stdout.write("ready\n")
        sys.stdout.flush()

    # Jobs.

    def on_message(self, _channel, method, properties, body):
        received_at = time.perf_counter()
        try:
            job_id, matrix = decode(body, properties, self.model)
        except JobError as error:
            self.publish(method.delivery_tag, properties, error.job_id, error_body(error))
            return
        self.pending.append(Job(method.delivery_tag, properties, job_id, matrix, received_at))
        self.pending_rows += matrix.shape[0]
        if self.per_message or self.pending_rows >= self.args.max_batch_rows or self.stopping:
            self.flush()
        elif self.timer is None:
            self.timer = self.connection.ioloop.call_later(self.max_delay_s, self.on_timer)

    def on_timer(self):
        self.timer = None
        self.flush()

    def flush(self):
        if self.timer is not None:
            self.connection.ioloop.remove_timeout(self.timer)
            self.timer = None
        while self.pending:
            batch, rows = [], 0
            while self.pending and (not batch or rows + self.pending[0].matrix.shape[0] <= self.args.max_batch_rows):
                job = self.pending.popleft()
                batch.append(job)
                rows += job.matrix.shape[0]
            self.pending_rows -= rows
            self.score(batch, rows)

    def score(self, batch, rows):
        started = time.perf_counter()
        matrix = batch[0].matrix if len(batch) == 1 else np.concatenate([job.matrix for job in batch])
        try:
            outputs = self.model.run(matrix)
        except Exception as e:  # noqa: BLE001 - any ONNX Runtime failure is answered per job
            for job in batch:
                error = JobError("internal", f"inference failed: {e}", job.job_id, self.model.name, self.model.version)
                self.publish(job.tag, job.properties, job.job_id, error_body(error))
            return
        inference = time.perf_counter() - started
        names = self.model.outputs
        start = 0
        for job in batch:
            n = job.matrix.shape[0]
            result = {
                "job_id": job.job_id,
                "status": "ok",
                "model": self.model.name,
                "model_version": self.model.version,
                "model_sha256": self.model.sha256,
                "rows": n,
                "outputs": {name: json_values(out[start : start + n]) for name, out in zip(names, outputs)},
                "timing_ms": {
                    "batching": ms(started - job.received_at),
                    "inference": ms(inference),
                    "total": ms(time.perf_counter() - job.received_at),
                },
            }
            start += n
            self.publish(job.tag, job.properties, job.job_id, json.dumps(result, separators=(",", ":")).encode())
        assert start == rows

    def publish(self, job_tag, job_properties, job_id, body):
        properties = pika.BasicProperties(
            content_type="application/json",
            delivery_mode=2,
            correlation_id=job_properties.correlation_id,
            message_id=job_id if job_id is not None and len(job_id.encode()) <= 255 else None,
            type="scoring.result",
        )
        self.publish_channel.basic_publish("", job_properties.reply_to or self.args.results_queue, body, properties)
        self.published += 1
        self.unconfirmed[self.published] = job_tag

    def on_confirm(self, frame):
        method = frame.method
        confirmed = method.NAME == "Basic.Ack"
        if method.multiple:
            # Sequence numbers were inserted in increasing order: stop at the first one not covered.
            sequences = list(itertools.takewhile(lambda s: s <= method.delivery_tag, self.unconfirmed))
        else:
            sequences = [method.delivery_tag]
        for sequence in sequences:
            tag = self.unconfirmed.pop(sequence, None)
            if tag is None:
                continue
            if not confirmed and self.consume_channel.is_open:
                log.warning("the broker refused a result; the job goes back to the queue")
                self.consume_channel.basic_nack(tag, requeue=True)
            self.settled.add(tag)
        self.acknowledge()
        if self.cancelled and not self.unconfirmed and not self.pending:
            self.close()

    def acknowledge(self):
        """Acknowledges, in one frame, every job up to the first whose result is not confirmed yet.

        Delivery tags count up from 1 on the consuming channel, and every delivery gets a result, so
        the settled tags close up behind the lowest unsettled one. Refused ones were nacked already,
        which a later multiple ack leaves alone.
        """
        floor = self.acked
        while floor + 1 in self.settled:
            floor += 1
            self.settled.remove(floor)
        if floor > self.acked:
            self.acked = floor
            if self.consume_channel.is_open:
                self.consume_channel.basic_ack(floor, multiple=True)

    # Shutdown.

    def request_stop(self, signum, _frame):
        log.info("signal %s: finishing the jobs in hand", signum)
        self.connection.ioloop.add_callback_threadsafe(self.stop)

    def stop(self):
        if self.stopping:
            return
        self.stopping = True
        self.connection.ioloop.call_later(SHUTDOWN_TIMEOUT_S, self.close)
        if self.consumer_tag and self.consume_channel and self.consume_channel.is_open:
            self.consume_channel.basic_cancel(self.consumer_tag, callback=self.on_cancelled)
        else:
            self.close()

    def on_cancelled(self, _frame):
        self.cancelled = True
        self.flush()
        if not self.unconfirmed:
            self.close()

    def close(self):
        if self.connection.is_closed:
            self.connection.ioloop.stop()
        elif not self.connection.is_closing:
            self.connection.close()


def error_body(error):
    body = {"job_id": error.job_id, "status": "error"}
    if error.model is not None:
        body["model"] = error.model
    if error.model_version is not None:
        body["model_version"] = error.model_version
    body["error"] = {"code": error.code, "message": error.message}
    return json.dumps(body, separators=(",", ":")).encode()


def parse_args(argv, description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/%2f", help="AMQP URI")
    p.add_argument("--queue", required=True, help="jobs queue to consume (must exist unless --declare)")
    p.add_argument("--declare", action="store_true", help="declare the jobs queue (durable) instead of checking it")
    p.add_argument("--results-queue", default="scoring.results", help="results of jobs without reply_to")
    p.add_argument("--model", required=True, help="path to model.onnx, e.g. models/credit_default/1/model.onnx")
    p.add_argument("--model-name", help="model name jobs ask for (default: the folder above the version folder)")
    p.add_argument("--model-version", type=int, help="model version (default: the version folder's number)")
    p.add_argument("--features-config", help="the model's config.yaml: feature names (for records) and outputs")
    p.add_argument("--prefetch", type=int, default=256, help="unacknowledged jobs held at once")
    p.add_argument("--intra-threads", type=int, default=0, help="ONNX Runtime threads per run; 0: one per core")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="longest a batch waits for more jobs")
    p.add_argument("--max-batch-rows", type=int, default=1024, help="rows that close a batch at once")
    p.add_argument("--log-level", default="WARNING", help="Python logging level, on stderr")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    return args


def main(argv=None, per_message=False, doc=__doc__):
    args = parse_args(argv, (doc or "").strip().splitlines()[0])
    worker = Worker(args, per_message=per_message)
    signal.signal(signal.SIGTERM, worker.request_stop)
    signal.signal(signal.SIGINT, worker.request_stop)
    return worker.run()


if __name__ == "__main__":
    sys.exit(main())
