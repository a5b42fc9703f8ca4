"""Sub-commands of the ``pmoe`` command line, one module each (see :mod:`pmoe.cli`)."""
