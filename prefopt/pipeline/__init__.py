"""The pipeline over the library: config surface, stages (cached), runs, evaluation of saved runs, sweeps.

Sits between the library (data -> models -> backends -> eval -> reports) and the CLI; imports flow into it only.
"""
