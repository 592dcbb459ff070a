"""The step-mode IVR (the provider guide: docs/): the provider protocol's models
(`models`), its HTTP client (`provider`), and the sans-IO session state machine,
whose entry points are `machine` (its docstring maps the other modules: phases,
state, session, handlers, and `actions/`, one module per action family)."""
