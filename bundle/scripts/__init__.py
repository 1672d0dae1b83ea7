"""Custom code of the PanNuke nuclei bundle, one folder per stage of the data flow (see docs/README.md).

Importing it makes the bundle's expected errors (scripts/core/errors.py) end a run with one readable message.
"""

from scripts.core.errors import install_error_report

install_error_report()
