"""`rh-lens` on the planted-head model, in a process of its own: `python tests/planted_cli.py ARGS`.

Any --model loads the planted model. PLANTED_HOLD_UNTIL=PATH makes every detection trial wait
until PATH exists (to hold a run open while another process tries the same directory, however
long that one takes to start).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from planted import build_planted_model  # noqa: E402

import rh_lens.app.cli as cli  # noqa: E402
import rh_lens.detection.run as detection  # noqa: E402

# The module that loads models for the command line (rh_lens.app.workflows; rh_lens.cli before it).
loader = sys.modules.get("rh_lens.app.workflows", cli)
loader.load_model = lambda name, **kwargs: build_planted_model()

hold = os.environ.get("PLANTED_HOLD_UNTIL")
if hold:
    score_trial = detection.score_trial  # called as each trial's answer ends

    def held_trial(*args, **kwargs):
        while not os.path.exists(hold):
            time.sleep(0.05)
        return score_trial(*args, **kwargs)

    detection.score_trial = held_trial

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
