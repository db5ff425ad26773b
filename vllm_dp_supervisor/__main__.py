import sys

from vllm_dp_supervisor.cli import main

sys.exit(main())
