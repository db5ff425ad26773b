"""`python3 -m vllm_dp_supervisor.healthcheck`: exit 0 if the supervisor on this host answers /live.

For a container's HEALTHCHECK: standard library only, reads the port the way the supervisor does
(SUPERVISOR_SUPERVISOR_PORT, default 9256).
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("SUPERVISOR_SUPERVISOR_PORT", "9256")
    url = f"http://127.0.0.1:{port}/live"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return 0 if response.status == 200 else 1
    except urllib.error.HTTPError as exc:
        print(f"healthcheck: {url} answered {exc.code}", file=sys.stderr)
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck: {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
