"""`python -m hf_minigpt.benchmark`: what minigpt-bench runs, and the child processes it starts."""

from . import main

main()
