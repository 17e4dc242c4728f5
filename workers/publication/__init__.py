"""Publications' runtime: the outlet their messages go through (an exchange, publisher confirms) and
``republish`` (a publication's checkpoints moved back, so a consumer that lost its data gets it again).

The publication itself (mapping, envelope) is ``projections.publication``; the worker runs it like any
subscriber (workers/projector).
"""
