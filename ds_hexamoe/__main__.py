"""``python -m ds_hexamoe`` is the ``ds-hexamoe`` command."""
import sys

from ds_hexamoe.cli import main

sys.exit(main())
