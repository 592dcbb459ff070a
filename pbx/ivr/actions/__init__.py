"""The action families of the step-mode IVR machine, one module each (the list is in
`pbx.ivr.machine`; the table that maps each action type to its function is
`pbx.ivr.handlers.EXECUTORS`)."""
