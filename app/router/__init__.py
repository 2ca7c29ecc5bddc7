"""Routing decisions, pure and Ray-free: the fleet's state and prefix index, the scheduler that runs a
profile of plugins (filters, scorers, a picker; `plugins/`), the TTFT cost model, and admission stages."""
