"""Plays one round of FastChat's Gradio arena (battle tab) as a browser would, through
gradio_client, and prints what it saw as JSON. Run by test_fastchat_arena.py with the Python of
the environment that holds gradio (`python fastchat_arena_client.py URL QUESTION`).
"""

from __future__ import annotations

import json
import sys

from gradio_client import Client

CURSOR = "▌"  # FastChat's UI appends it to a side's answer while that side streams


def main(url: str, question: str) -> None:
    client = Client(url, verbose=False)
    # The page's load event: it hands the model list to every tab.
    loaded = client.predict({}, api_name="/load_demo")
    # The battle tab's textbox.submit chain (Gradio names its events after their functions,
    # numbering repeats in the order the UI registers them).
    client.predict("", "", question, api_name="/add_text")
    job = client.submit(0.0, 1.0, 24, api_name="/bot_response_multi_1")
    updates = [[(side[-1][1] or "").rstrip(CURSOR) for side in sides] for sides in job]
    print(json.dumps({"loaded": loaded, "updates": updates}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
