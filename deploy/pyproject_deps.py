"""Print some of pyproject.toml's pinned dependencies, one per line, for images that need only part of them.

python pyproject_deps.py --only fastapi uvicorn ...   the gateway image: just the gateway's packages
python pyproject_deps.py --without torch triton       a GPU image whose base already ships a CUDA torch
python pyproject_deps.py --all                        everything, e.g. for a wheelhouse (scripts/build_wheelhouse.sh)
"""

import argparse
import re
import tomllib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pyproject", default="pyproject.toml")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--only", nargs="+", metavar="NAME", help="keep just these packages")
    group.add_argument("--without", nargs="+", metavar="NAME", help="keep all but these packages")
    group.add_argument("--all", action="store_true", help="keep every package")
    args = parser.parse_args()

    with open(args.pyproject, "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    names = {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower(): r for r in requirements}
    wanted = set(n.lower() for n in (args.only or args.without or []))
    unknown = wanted - names.keys()
    if unknown:  # a renamed or dropped dependency must break the image build, not slip through
        parser.error(f"not dependencies in {args.pyproject}: {', '.join(sorted(unknown))}")
    for name, requirement in names.items():
        if args.all or (name in wanted) == bool(args.only):
            print(requirement)


if __name__ == "__main__":
    main()
