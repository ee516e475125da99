"""`loom chat`: talk to a Loom server in the terminal, token by token.

Interactive by default; `-p TEXT` asks one question, prints the streamed
answer on stdout and exits. Only the client library is imported here, never
torch or the server, so this starts fast anywhere.

    cli.py       the two modes (one-shot, interactive) and the flags
    commands.py  the interactive slash commands
    session.py   one conversation: history, answers streamed token by token
    render.py    usage lines, hidden-state previews, errors a person can act on
    settings.py  flags, the backends file and the environment merged
"""
from loom.chat.cli import add_arguments, run

__all__ = ["add_arguments", "run"]
