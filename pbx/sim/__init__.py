"""`pbx-sim`: drive a step-mode provider through scripted calls, no SIP, no phone.

`scenario` (what the caller does, what must happen), `runner` (one call: the real
executor path on a virtual clock), `cli` (the console script). docs/simulator.md is
the user's guide.
"""
