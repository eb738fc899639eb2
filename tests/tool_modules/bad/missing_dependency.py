"""A module importing a package that is not installed."""

import no_such_package_for_tools  # noqa: F401
