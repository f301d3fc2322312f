"""`python -m minigpt_commands`: write every command's --help text again, after its flags changed."""

from . import write_help

write_help()
