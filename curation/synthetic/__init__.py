"""The small synthetic world: a generated lake of coloured scenes with a known ground truth
(sample, scene, palette), for the demo, the tests and the small-world benchmarks.
"""
