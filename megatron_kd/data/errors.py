"""The one exception type of the data package."""


class DataError(ValueError):
    """Bad input to the data pipeline; the one-line message names the file or flag and what was
    expected, so a user can fix it without reading a traceback."""
