"""Entry point; runs itself under the project's ``.venv`` when started by a bare interpreter."""

import sys

from bench.common import ensure_project_python

ensure_project_python("bench.vs_flower")

from bench.vs_flower.main import main  # noqa: E402 - only after the interpreter is the project's

sys.exit(main())
