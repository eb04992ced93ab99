#!/usr/bin/env python3
"""Helpers for scripts/check_observability.sh (Python standard library and pika only).

Subcommands:
  free-port                      print a free TCP port on 127.0.0.1
  publish-bad-jobs               publish three bad jobs and wait for their error results
  check-scrape FILE              check a /metrics scrape against the documented metric list
  prometheus-config SRC DST ...  write a scrape config for the check, derived from SRC
  wait-prometheus URL            wait until Prometheus has scraped every target at least twice
  evaluate URL DASHBOARD         evaluate every dashboard and alert expression through Prometheus

Queue names and the broker URL come from the same BATCHSCORE__AMQP__* variables the worker reads;
the check sets them to its private RabbitMQ node (scripts/private_rabbitmq.sh).
"""

import json
import math
import os
import re
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

# ---------------------------------------------------------------------------------------------
# The documented metric list (docs/OBSERVABILITY.md). Each entry: type, label names, and whether
# the series must exist after the check's traffic (good jobs; a non-JSON job, a job with the
# wrong number of features and one for an unknown model). Counters of rare events (reconnects,
# stage failures) appear only once the event happened, so they may be absent; when present their
# labels are still checked. The load-failure counter is exported at 0 from a model's first load;
# it stays optional because a model none of whose versions ever loaded has it only from its first
# failure.
METRICS = {
    "batchscore_jobs_received_total": ("counter", {"model", "lane", "publisher"}, True),
    "batchscore_jobs_completed_total": ("counter", {"model", "lane", "status"}, True),
    "batchscore_job_errors_total": ("counter", {"code"}, True),
    "batchscore_rows_scored_total": ("counter", {"model"}, True),
    "batchscore_batches_total": ("counter", {"model", "version", "reason"}, True),
    "batchscore_broker_reconnects_total": ("counter", set(), False),
    "batchscore_stage_failures_total": ("counter", {"stage"}, False),
    "batchscore_dead_lettered_total": ("counter", {"code"}, True),
    "batchscore_model_load_failures_total": ("counter", {"model"}, False),
    "batchscore_model_archive_failures_total": ("counter", {"model"}, False),
    "batchscore_job_duration_seconds": ("histogram", {"model", "lane"}, True),
    "batchscore_queue_wait_seconds": ("histogram", {"lane"}, True),
    "batchscore_batch_wait_seconds": ("histogram", {"model"}, True),
    "batchscore_inference_duration_seconds": ("histogram", {"model", "version"}, True),
    "batchscore_publish_duration_seconds": ("histogram", set(), True),
    "batchscore_batch_rows": ("histogram", {"model", "version"}, True),
    "batchscore_batch_jobs": ("histogram", {"model", "version"}, True),
    "batchscore_inflight_jobs": ("gauge", set(), True),
    "batchscore_inflight_rows": ("gauge", set(), True),
    "batchscore_sessions_busy": ("gauge", {"model", "version"}, True),
    "batchscore_sessions_idle": ("gauge", {"model", "version"}, True),
    "batchscore_model_info": ("gauge", {"model", "version", "sha256", "provider"}, True),
    "batchscore_broker_connected": ("gauge", set(), True),
    "batchscore_ready": ("gauge", set(), True),
}
LABEL_VALUES = {
    "lane": {"online", "bulk"},
    "status": {"ok", "error", "expired"},
    "code": {"invalid_json", "invalid_input", "unknown_model", "too_large", "internal", "expired", "forbidden"},
    "reason": {"idle", "size", "delay", "drain"},
    "stage": {"consumer", "batcher", "inference", "result", "publisher"},
}

# Model name of the check's unknown_model job.
UNKNOWN_MODEL = "obscheck_no_such_model"

# Dashboard expressions (as written in the JSON, before substitution) that may return no series
# on a healthy worker that has just scored jobs. Every entry must still parse and evaluate, and
# must match an expression in the dashboard (a stale entry fails the check).
ALLOWED_EMPTY = {
    # Counts reconnections after a lost broker connection: none during the check.
    "sum by (instance) (increase(batchscore_broker_reconnects_total[$__rate_interval]))",
    # Counts failed or panicked pipeline stages: none on a healthy worker, so no series yet.
    "sum by (instance, stage) (increase(batchscore_stage_failures_total[$__rate_interval]))",
}

# Alert rules whose condition must be false for the check's healthy worker (they concern the
# worker itself).
ALERTS_MUST_BE_EMPTY = {"BatchscoreWorkerDown", "BatchscoreNoModelLoaded", "BatchscoreBrokerDisconnected",
                        "BatchscoreStageFailed"}
# Alert rules whose condition must be true after the check's traffic, and why.
ALERTS_MUST_HOLD = {
    "BatchscoreDeadLetterNotEmpty": "the check's bad jobs are dead-lettered into scoring.dlq, the queue it watches",
}
# The remaining rules watch a backlog the check does not build (BatchscoreBacklogGrowing) or
# traffic too small to trip their guards (error ratio, latency): they must evaluate without error,
# every series they read must exist (below), and their result is reported.

# Metric families an alert rule may read although they are absent during the check: the
# documented counters of rare events (METRICS entries not required).
ALERT_SERIES_MAY_BE_ABSENT = {family for family, (_, _, required) in METRICS.items() if not required}


def fail(message):
    print(f"check_observability: {message}", file=sys.stderr)
    sys.exit(1)


def amqp_settings():
    env = os.environ
    return {
        # No default: the check's traffic goes to its private node, never to a shared broker.
        "url": env["BATCHSCORE__AMQP__URL"],
        "jobs": env["BATCHSCORE__AMQP__JOBS_QUEUE"],
        "results": env["BATCHSCORE__AMQP__RESULTS_QUEUE"],
    }


# ------------------------------------------------------------------------------------ free-port
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


# ----------------------------------------------------------------------------- publish-bad-jobs
def publish_bad_jobs():
    import pika

    amqp = amqp_settings()
    connection = pika.BlockingConnection(pika.URLParameters(amqp["url"]))
    channel = connection.channel()
    channel.confirm_delivery()
    now = int(time.time())
    bad = [
        # Not JSON: answered invalid_json; no model is known.
        ("obscheck-invalid-json", b"{this is not json", "invalid_json"),
        # Valid JSON, wrong number of features for credit_default: answered invalid_input.
        ("obscheck-invalid-input",
         json.dumps({"job_id": "obscheck-invalid-input", "model": "credit_default", "rows": [[1.0, 2.0, 3.0]]}).encode(),
         "invalid_input"),
        # A model that does not exist: answered unknown_model. Its name must not become a label
        # value (check-scrape), or any publisher could create series without bound.
        ("obscheck-unknown-model",
         json.dumps({"job_id": "obscheck-unknown-model", "model": UNKNOWN_MODEL, "rows": [[1.0]]}).encode(),
         "unknown_model"),
    ]
    for job_id, body, _ in bad:
        properties = pika.BasicProperties(content_type="application/json", message_id=job_id,
                                          delivery_mode=2, timestamp=now)
        # mandatory: an unroutable publish (the worker has not declared the queue) raises.
        channel.basic_publish("", amqp["jobs"], body, properties, mandatory=True)
    wanted = {job_id: code for job_id, _, code in bad}
    deadline = time.monotonic() + 30
    while wanted and time.monotonic() < deadline:
        method, _properties, body = channel.basic_get(amqp["results"], auto_ack=True)
        if method is None:
            time.sleep(0.2)
            continue
        result = json.loads(body)
        job_id = result.get("job_id")
        if job_id in wanted:
            code = (result.get("error") or {}).get("code")
            if result.get("status") != "error" or code != wanted[job_id]:
                fail(f"bad job {job_id}: expected an error result with code {wanted[job_id]}, got {body[:300]!r}")
            print(f"  bad job {job_id} answered with error {code}")
            del wanted[job_id]
    connection.close()
    if wanted:
        fail(f"no result within 30 s for bad jobs {sorted(wanted)} on {amqp['results']}")


# --------------------------------------------------------------------------------- check-scrape
SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$')
LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')


def parse_exposition(text):
    """Returns (types, samples): family -> type, and a list of (name, labels, value)."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(None, 3)
            types[family] = kind.strip()
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            if not match:
                fail(f"unparsable exposition line: {line!r}")
            name, raw_labels, value = match.groups()
            labels = dict(LABEL.findall(raw_labels or ""))
            samples.append((name, labels, float(value)))
    return types, samples


def check_scrape(path):
    text = open(path, encoding="utf-8").read()
    types, samples = parse_exposition(text)
    problems, missing = [], []
    for family, (kind, label_names, required) in METRICS.items():
        if family not in types:
            (missing if required else []).append(family)
            if not required:
                print(f"  absent (allowed until the event happens): {family}")
            continue
        if types[family] != kind:
            problems.append(f"{family}: type {types[family]}, expected {kind}")
            continue
        names = {family} if kind != "histogram" else {family + s for s in ("_bucket", "_sum", "_count")}
        rows = [(n, l, v) for n, l, v in samples if n in names]
        if not rows:
            (missing if required else []).append(family)
            continue
        for name, labels, value in rows:
            got = set(labels) - {"le"}
            if got != label_names:
                problems.append(f"{name}{labels}: labels {sorted(got)}, expected {sorted(label_names)}")
            for label, allowed in LABEL_VALUES.items():
                if label in labels and labels[label] not in allowed:
                    problems.append(f"{name}: {label}={labels[label]!r} is not one of {sorted(allowed)}")
            if name.endswith("_bucket") and "le" not in labels:
                problems.append(f"{name}: bucket without le")
        if kind == "histogram" and not any(n.endswith("_bucket") and l.get("le") == "+Inf" for n, l, _ in rows):
            problems.append(f"{family}: no +Inf bucket")
        print(f"  present: {family} ({len(rows)} samples)")
    for family in sorted(types):
        if family.startswith("batchscore_") and family not in METRICS:
            print(f"  note: {family} is exported but not in the documented list")
    values = {n: v for n, l, v in samples if n in ("batchscore_ready", "batchscore_broker_connected")}
    for name, value in values.items():
        if value != 1:
            problems.append(f"{name} = {value:g} on a worker that answered /readyz, expected 1")
    for name, labels, value in samples:
        if name == "batchscore_model_info":
            if value != 1:
                problems.append(f"batchscore_model_info{labels} = {value:g}, expected 1")
            if not re.fullmatch(r"[0-9a-f]{64}", labels.get("sha256", "")):
                problems.append(f"batchscore_model_info{labels}: sha256 is not 64 hex digits")
    for name, labels, _ in samples:
        if name.startswith("batchscore_") and UNKNOWN_MODEL in labels.values():
            problems.append(f"{name}{labels}: the model name of an unknown_model job became a label value")
            break
    codes = {l.get("code") for n, l, _ in samples if n == "batchscore_job_errors_total"}
    for code in ("invalid_json", "invalid_input", "unknown_model"):
        if "batchscore_job_errors_total" in types and code not in codes:
            problems.append(f"batchscore_job_errors_total has no code={code} series after a {code} job")
    completed = {(l.get("model"), l.get("status")) for n, l, _ in samples if n == "batchscore_jobs_completed_total"}
    for status in ("ok", "error"):
        if "batchscore_jobs_completed_total" in types and ("credit_default", status) not in completed:
            problems.append(f'batchscore_jobs_completed_total has no series with model="credit_default", status="{status}"'
                            + (" after an invalid_input job for that model" if status == "error" else ""))
    for family in missing:
        problems.append(f"{family}: missing after scoring jobs (documented, expected)")
    if problems:
        print("scrape does not match the documented metric list:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        sys.exit(1)


# ----------------------------------------------------------------------------- prometheus-config
def prometheus_config(src, dst, worker, rabbitmq, alerts):
    """The deployed prometheus.yml with the check's targets, 1 s intervals and an absolute path
    to the alert rules, so the check exercises its jobs, paths and params as written."""
    text = open(src, encoding="utf-8").read()
    replacements = [
        ('"localhost:9464"', f'"{worker}"'),
        ('"localhost:15692"', f'"{rabbitmq}"'),
        ("scrape_interval: 15s", "scrape_interval: 1s"),
        ("evaluation_interval: 15s", "evaluation_interval: 1s"),
        ("  - alerts.yml", f"  - {alerts}"),
    ]
    for old, new in replacements:
        if old not in text:
            fail(f"{src} no longer contains {old!r}; update scripts/observability_check.py")
        text = text.replace(old, new)
    with open(dst, "w", encoding="utf-8") as f:
        f.write(text)


# ------------------------------------------------------------------------------------ Prometheus
def api(base, path, **params):
    data = urllib.parse.urlencode(params).encode() if params else None
    request = urllib.request.Request(base + path, data=data)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            return json.loads(body)
        except ValueError:
            return {"status": "error", "error": f"HTTP {error.code}: {body[:200]!r}"}


def wait_prometheus(base):
    deadline = time.monotonic() + 60
    last = None
    while time.monotonic() < deadline:
        try:
            targets = api(base, "/api/v1/targets")["data"]["activeTargets"]
        except (OSError, KeyError, ValueError) as error:
            last = str(error)
            time.sleep(0.5)
            continue
        down = [f"{t['labels']['job']} {t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}"
                for t in targets if t["health"] != "up"]
        if targets and not down:
            # Two scrapes of every target: `up` and the first samples exist.
            time.sleep(2.5)
            print(f"  {len(targets)} targets up: " + ", ".join(sorted(t["labels"]["job"] for t in targets)))
            return
        last = "; ".join(down) or "no targets yet"
        time.sleep(0.5)
    fail(f"Prometheus targets not up within 60 s: {last}")


# ------------------------------------------------------------------------------------- evaluate
# Vector selectors of the project's and RabbitMQ's metrics (and `up`) in an alert expression.
ALERT_SELECTOR = re.compile(r'\b(?:(?:batchscore|rabbitmq)_[A-Za-z0-9_:]*|up)\b(?:\{[^}]*\})?')
VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)(?::[a-z]+)?\}|([A-Za-z_][A-Za-z0-9_]*))")


def collect_targets(panels, found):
    for panel in panels:
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((panel.get("title", "?"), target.get("refId", "?"), target["expr"]))
        collect_targets(panel.get("panels", []), found)
    return found


def substitute(expr, values):
    def replace(match):
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(name)
        return values[name]
    return VARIABLE.sub(replace, expr)


def describe(result):
    series = result["data"]["result"] if result["data"]["resultType"] in ("vector", "matrix") else [result["data"]]
    if result["data"]["resultType"] == "scalar":
        return 1, result["data"]["result"][1], False
    values = [float(s["value"][1]) for s in series if "value" in s]
    nan = bool(values) and all(math.isnan(v) for v in values)
    sample = ", ".join(f"{v:.4g}" for v in values[:3]) + (" …" if len(values) > 3 else "")
    return len(series), sample, nan


def evaluate(base, dashboard_path):
    dashboard = json.load(open(dashboard_path, encoding="utf-8"))
    values = {
        # Grafana's built-in interval variables, as Grafana would set them for a short range.
        "__rate_interval": "1m", "__interval": "15s", "__range": "5m", "__range_s": "300",
        "__interval_ms": "15000", "__range_ms": "300000",
        # Dashboard variables: the check's model and queues.
        "model": "credit_default",
        "jobs_queue": os.environ["BATCHSCORE__AMQP__JOBS_QUEUE"],
        "dead_letter_queue": os.environ.get("BATCHSCORE__AMQP__DEAD_LETTER_QUEUE", "scoring.dlq"),
        "datasource": "prometheus",
    }
    declared = {v["name"] for v in dashboard["templating"]["list"]}
    for name in ("datasource", "model", "jobs_queue", "dead_letter_queue"):
        if name not in declared:
            fail(f"dashboard has no ${name} variable")

    failures, empty, nan_only, rows = [], [], [], []
    targets = collect_targets(dashboard["panels"], [])
    # Variable queries of the form label_values(metric, label): the metric must have the label.
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        match = re.fullmatch(r"\s*label_values\((.+),\s*([A-Za-z_][A-Za-z0-9_]*)\)\s*", query or "") if variable["type"] == "query" else None
        if match:
            targets.append((f"variable ${variable['name']}", "-", f"count by ({match.group(2)}) ({match.group(1)})"))

    exprs = {expr for _, _, expr in targets}
    for stale in sorted(ALLOWED_EMPTY - exprs):
        failures.append(f"allow-list entry matches no dashboard expression: {stale}")

    print(f"  dashboard: {len(targets)} expressions")
    for title, ref, expr in targets:
        try:
            query = substitute(expr, values)
        except KeyError as error:
            failures.append(f"[{title} {ref}] unknown variable ${error.args[0]} in: {expr}")
            continue
        result = api(base, "/api/v1/query", query=query)
        if result.get("status") != "success":
            failures.append(f"[{title} {ref}] does not evaluate ({result.get('error')}): {query}")
            rows.append(("ERROR", title, query))
            continue
        count, sample, nan = describe(result)
        if count == 0:
            if expr in ALLOWED_EMPTY:
                rows.append(("empty (allowed)", title, query))
            else:
                rows.append(("EMPTY", title, query))
                empty.append(f"[{title} {ref}] no series: {query}")
        else:
            rows.append((f"{count} series = {sample}" + (" (NaN: no increase in window)" if nan else ""), title, query))
            if nan:
                nan_only.append(f"[{title} {ref}] {query}")

    # Alert rules as loaded by Prometheus: each must have been evaluated without error, and each
    # expression must evaluate through the query API.
    deadline = time.monotonic() + 15
    while True:
        groups = api(base, "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(not r.get("lastEvaluation", "").startswith("0001") for r in rules):
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if not rules:
        failures.append("Prometheus loaded no alert rules")
    print(f"  alert rules: {len(rules)}")
    for rule in rules:
        name = rule.get("name")
        if rule.get("health") != "ok":
            failures.append(f"[alert {name}] rule health {rule.get('health')}: {rule.get('lastError')}")
        result = api(base, "/api/v1/query", query=rule["query"])
        if result.get("status") != "success":
            failures.append(f"[alert {name}] does not evaluate ({result.get('error')}): {rule['query']}")
            rows.append(("ERROR", f"alert {name}", rule["query"]))
            continue
        count, sample, _ = describe(result)
        # RabbitMQ refreshes its queue metrics every few seconds (collect_statistics_interval):
        # wait, bounded, for the dead-lettered jobs to show.
        deadline = time.monotonic() + 20
        while not count and name in ALERTS_MUST_HOLD and time.monotonic() < deadline:
            time.sleep(0.5)
            result = api(base, "/api/v1/query", query=rule["query"])
            count, sample, _ = describe(result) if result.get("status") == "success" else (0, "", False)
        if count and name in ALERTS_MUST_BE_EMPTY:
            failures.append(f"[alert {name}] condition is true for the healthy check worker: {result['data']['result']}")
        if not count and name in ALERTS_MUST_HOLD:
            failures.append(f"[alert {name}] condition is false, but {ALERTS_MUST_HOLD[name]}: {rule['query']}")
        # A rule reading a series that does not exist (a misspelt metric, label or queue name)
        # would never fire: each selector must match series now.
        for selector in sorted(set(m.group(0) for m in ALERT_SELECTOR.finditer(rule["query"]))):
            family = re.sub(r"_(bucket|sum|count)$", "", selector.split("{")[0])
            if family in ALERT_SERIES_MAY_BE_ABSENT:
                continue
            found = api(base, "/api/v1/query", query=f"count({selector})")
            if found.get("status") != "success" or not found["data"]["result"]:
                failures.append(f"[alert {name}] reads {selector}, which matches no series")
        state = "condition false" if count == 0 else f"condition true for {count} series"
        rows.append((f"{state} (state {rule.get('state')})", f"alert {name}", " ".join(rule["query"].split())))

    for status, title, query in rows:
        print(f"  {status:<46.46} {title:<45.45} {query}")
    if nan_only:
        print("  note: these returned only NaN (no increase between scrapes):")
        for line in nan_only:
            print(f"    {line}")
    if empty:
        print("dashboard expressions that returned no series:", file=sys.stderr)
        for line in empty:
            print(f"  - {line}", file=sys.stderr)
    if failures:
        print("expression failures:", file=sys.stderr)
        for line in failures:
            print(f"  - {line}", file=sys.stderr)
    if empty or failures:
        sys.exit(1)


def main(argv):
    if not argv:
        fail(__doc__)
    command, args = argv[0], argv[1:]
    commands = {
        "free-port": free_port,
        "publish-bad-jobs": publish_bad_jobs,
        "check-scrape": check_scrape,
        "prometheus-config": prometheus_config,
        "wait-prometheus": wait_prometheus,
        "evaluate": evaluate,
    }
    if command not in commands:
        fail(f"unknown subcommand {command}\n{__doc__}")
    commands[command](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
