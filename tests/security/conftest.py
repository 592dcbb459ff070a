"""Security regression tests (issue 8): the e2e system fixtures, shared with tests/e2e."""

from tests.e2e.conftest import provider, system, workdir

__all__ = ["provider", "system", "workdir"]
