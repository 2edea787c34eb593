"""Tool calling: tool_choice plans (plan.py), how calls are read from the output (modes.py,
parsers.py, json_scan.py), and earlier calls rendered back through the template (messages.py)."""
