"""``python -m conilium.cli``: the ``conilium`` command."""

from . import main

main(prog_name="conilium")
