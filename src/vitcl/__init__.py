"""vitcl: continual learning with vision transformers."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """vitcl.run, vitcl.load_run, vitcl.report (src/vitcl/api.py), imported on first use so that `import vitcl`
    stays cheap."""
    if name in ("run", "load_run", "report", "Run"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'vitcl' has no attribute {name!r}")
