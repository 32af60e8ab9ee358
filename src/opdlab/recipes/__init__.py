"""opdlab.recipes"""
