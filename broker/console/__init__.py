"""``credbroker console``: the web console for approvers and responders (see app.py)."""
