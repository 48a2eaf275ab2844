// Command labclient is this client in `tether lab --client-cmd` (contract: docs/LAB.md,
// "Bring your own client"):
//
//	go build -o /tmp/labclient ./cmd/labclient
//	tether lab run blackhole --client-cmd '/tmp/labclient {server}'
//
// It prints READY once the server's greeting arrived, RECEIVED for each later message,
// DETECTED <reason> when the connection is gone; sends a message for each SEND line on
// stdin; exits when stdin closes.
package main

import (
	"bufio"
	"context"
	"fmt"
	"os"

	tether "example.invalid/tether/clients/go"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: labclient HOST:PORT")
		os.Exit(2)
	}
	ctx := context.Background()
	c, err := tether.Start(ctx, tether.Config{Addr: os.Args[1], ClientID: "lab-go"})
	if err != nil {
		fmt.Println("FAILED", err)
		os.Exit(1)
	}
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			if sc.Text() == "SEND" {
				_ = c.Send(ctx, []byte("after the fault"))
			}
		}
		_ = c.Close()
		os.Exit(0)
	}()
	greeted, detected := false, false
	for ev := range c.Events() {
		switch e := ev.(type) {
		case tether.Connected:
			if !greeted {
				_ = c.Send(ctx, []byte("hello"))
			}
		case tether.Message:
			if greeted {
				fmt.Println("RECEIVED")
			} else {
				fmt.Println("READY")
				greeted = true
			}
		case tether.Disconnected:
			if greeted && !detected && e.Disconnect.Reason != tether.ReasonLocalClose {
				detected = true
				fmt.Println("DETECTED", e.Disconnect.Reason)
			}
		}
	}
	select {}
}
