"""The algorithm core's bottom layer: frozen records, the table, composition, properties and checks.
"""
