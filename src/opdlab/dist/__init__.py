"""opdlab.dist"""
