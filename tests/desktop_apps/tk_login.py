#!/usr/bin/env python3
"""A small real Tk login form for vlad's UI-test tests and examples.

A "Name" entry and a "Log in" button; logging in shows "Welcome, <name>" below, or
"Error: name is required" when the name is empty. With a state file it writes its own state
(the name typed, the message shown, clicks, and where its widgets are on the root window) as
JSON every 50 ms; the tests read that file: it is the app's view, not vlad's. `--dark` draws
the same form in dark colours (the same layout, a different screen).

usage: tk_login.py [STATE.json] [--dark]
"""
import json
import os
import sys
import tkinter as tk

args = [a for a in sys.argv[1:] if not a.startswith("--")]
state_path = args[0] if args else None
dark = "--dark" in sys.argv[1:]

BG, FG, FIELD = ("#1e2630", "#f0f0f0", "#33404d") if dark else ("#f2f2f2", "#101010", "#ffffff")
FONT = ("DejaVu Sans", 14)

root = tk.Tk()
root.title("vlad login")
root.geometry("+40+40")
root.configure(bg=BG)

tk.Label(root, text="Name", bg=BG, fg=FG, font=FONT).grid(row=0, column=0, padx=12, pady=12,
                                                          sticky="e")
name = tk.StringVar()
entry = tk.Entry(root, textvariable=name, width=20, font=FONT, bg=FIELD, fg=FG,
                 insertbackground=FG)
entry.grid(row=0, column=1, padx=12, pady=12)

clicks = []
message = tk.Label(root, text="", width=26, anchor="w", bg=BG, fg=FG, font=FONT)


def login():
    clicks.append(True)
    typed = name.get().strip()
    if typed:
        message.config(text=f"Welcome, {typed}", fg=FG)
    else:
        message.config(text="Error: name is required", fg="#d02020")


button = tk.Button(root, text="Log in", command=login, font=FONT, bg=FIELD, fg=FG,
                   activebackground=FIELD, activeforeground=FG)
button.grid(row=1, column=1, padx=12, sticky="w")
message.grid(row=2, column=0, columnspan=2, padx=12, pady=16)


def geometry(w):
    return {"x": w.winfo_rootx(), "y": w.winfo_rooty(),
            "width": w.winfo_width(), "height": w.winfo_height()}


def dump():
    st = {
        "name": name.get(),
        "message": message.cget("text"),
        "clicks": len(clicks),
        "entry": geometry(entry),
        "button": geometry(button),
        "message_box": geometry(message),
        "window": geometry(root),
        "mapped": bool(root.winfo_viewable()),
    }
    tmp = state_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(st, f, ensure_ascii=False)
    os.replace(tmp, state_path)
    root.after(50, dump)


if state_path:
    root.after(50, dump)
root.mainloop()
