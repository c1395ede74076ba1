"""The helper scripts' results: one JSON object per line on stdout, which the tests parse
(tests/helpers.py: ``results``)."""
import json


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)
