"""(being written: see the open issue for this package)"""

__all__: list[str] = []
