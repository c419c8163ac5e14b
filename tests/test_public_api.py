"""The public API (``cdfast.__all__``) stays as it is unless a change means it to.

Every public function's and class's parameters (names, kinds, defaults; annotations left out, as
Python versions print them differently) and every public method's are compared with the listing in
``tests/public_api.txt``. A change that breaks callers' code fails here; one that is meant updates the
listing on purpose (``python tests/test_public_api.py --update``) and says so in its commit.
"""

import inspect
import sys
from pathlib import Path

import cdfast

LISTING = Path(__file__).with_name("public_api.txt")


def parameters(obj) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(?)"
    return str(sig.replace(parameters=[p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()],
                           return_annotation=inspect.Signature.empty))


def public_api() -> str:
    lines = []
    for name in sorted(cdfast.__all__):
        obj = getattr(cdfast, name)
        if inspect.isclass(obj):
            lines.append(f"class {name}{parameters(obj)}")
            for member, value in sorted(vars(obj).items()):
                if not member.startswith("_") and callable(value):
                    lines.append(f"    {name}.{member}{parameters(value)}")
        else:
            lines.append(f"{name}{parameters(obj)}")
    return "\n".join(lines) + "\n"


def test_the_public_api_is_the_listed_one():
    listed = LISTING.read_text()
    now = public_api()
    if now != listed:
        changed = sorted(set(now.splitlines()) ^ set(listed.splitlines()))
        raise AssertionError("the public API differs from tests/public_api.txt (update it with "
                             "`python tests/test_public_api.py --update` if the change is meant):\n"
                             + "\n".join(("now:    " if line in now.splitlines() else "listed: ") + line
                                         for line in changed))


if __name__ == "__main__" and "--update" in sys.argv:
    LISTING.write_text(public_api())
    print(f"wrote {LISTING}")
