"""placeholder until the op lands"""
