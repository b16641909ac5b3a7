"""`python -m worker`: the same as `sfllm-worker`."""

from worker.server import main

main()
