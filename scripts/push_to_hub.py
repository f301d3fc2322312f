"""Push an output folder to a model hub; same as the `minigpt-push` console script (see --help).

    python scripts/push_to_hub.py runs/pydoc your-name/minigpt-pydoc --dry-run
"""

from minigpt_commands import push as main

if __name__ == "__main__":
    main()
