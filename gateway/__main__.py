"""python -m gateway: the same as sfllm-gateway."""

from gateway.app import main

main()
