#!/usr/bin/env python3
"""A Python scoring worker that runs each job on its own, for the end-to-end benchmark to compare with.

The same worker as batching_worker.py (same arguments, message contract, confirms and shutdown),
except that every job is scored by its own ONNX Runtime run as soon as it arrives: no rows are
shared between jobs, and --max-delay-ms and --max-batch-rows have no effect.

    python3 benches/python/per_message_worker.py --queue scoring.jobs \\
        --model models/credit_default/1/model.onnx --features-config models/credit_default/config.yaml

Prints `ready` on stdout once consuming; stops on SIGTERM or SIGINT after finishing the jobs it holds.
"""

import sys

import batching_worker

if __name__ == "__main__":
    sys.exit(batching_worker.main(per_message=True, doc=__doc__))
