"""Entry points for the CLI and for `ray job submit`: `python -m shardmerge.jobs.<name>` (installed) or
`python -m jobs.<name>` from a source checkout (e.g. one shipped with `ray job submit --working-dir .`)."""

if __name__ == "jobs":  # imported under its checkout name: bind the checkout as the `shardmerge` package first
    import importlib.util as _util
    import sys as _sys
    from pathlib import Path as _Path

    _root = _Path(__file__).resolve().parent.parent
    if "shardmerge" not in _sys.modules:
        _spec = _util.spec_from_file_location(
            "shardmerge", _root / "__init__.py", submodule_search_locations=[str(_root)]
        )
        _module = _util.module_from_spec(_spec)
        _sys.modules["shardmerge"] = _module
        _spec.loader.exec_module(_module)
        _module.CHECKOUT = str(_root)  # the Ray pool ships this checkout to its workers (engine/run/ray_session.py)
