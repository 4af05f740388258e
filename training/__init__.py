"""Trainers for the weights no paper released: the hand generator and the AnyDressing garment weights.

``python -m humanref train hand-generator|garments|validate-data ...`` (see ``training.cli``) in one process, or
``accelerate launch -m humanref train ...`` in several (the shared loop, ``training.loop``, runs on Accelerate).
Both trainers write through the modules that define the layouts the nodes load (``pipelines.hands.weights``,
``pipelines.anydressing.weights``). Nothing here is imported by the nodes.
"""
