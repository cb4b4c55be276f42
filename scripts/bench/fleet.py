#!/usr/bin/env python3
"""Turn a `ferrohub bench provision` fleet file into inputs for the anchor brokers.

Usage: fleet.py passwd FLEET.jsonl > FILE   (plain "user:password" lines for every client with a
password; hash them in place with `mosquitto_passwd -U FILE`).
"""

import json
import sys


def main():
    if len(sys.argv) != 3 or sys.argv[1] != "passwd":
        sys.exit(__doc__)
    with open(sys.argv[2]) as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            e = json.loads(raw)
            if e.get("username") and e.get("password"):
                print(f"{e['username']}:{e['password']}")


if __name__ == "__main__":
    main()
