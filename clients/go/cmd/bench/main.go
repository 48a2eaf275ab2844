// Command bench measures figures for BENCHMARKS.md against a `tether serve --echo`:
//
//	go run ./cmd/bench throughput 127.0.0.1:7300 100000   # 64 B messages through a session
//	go run ./cmd/bench idle 127.0.0.1:7300 1000           # RSS per idle connection
//
// throughput keeps at most window (1000) messages in flight: unwindowed, a fast client can
// deadlock the reference echo server (its echo loop waits for room in the client's replay
// buffer while it has stopped reading, and so the client's ACKs).
package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"time"

	tether "example.invalid/tether/clients/go"
)

func rssKiB() int {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "VmRSS:") {
			n, _ := strconv.Atoi(strings.Fields(sc.Text())[1])
			return n
		}
	}
	return 0
}

func waitConnected(c *tether.Client) {
	for {
		ev, err := c.Next(context.Background())
		if err != nil {
			panic(err)
		}
		if _, ok := ev.(tether.Connected); ok {
			return
		}
	}
}

func main() {
	mode, addr := os.Args[1], os.Args[2]
	n, _ := strconv.Atoi(os.Args[3])
	ctx := context.Background()
	switch mode {
	case "throughput":
		c, err := tether.Start(ctx, tether.Config{Addr: addr, ClientID: "bench-go"})
		if err != nil {
			panic(err)
		}
		waitConnected(c)
		started := time.Now()
		const window = 1000
		inflight := make(chan struct{}, window)
		go func() {
			payload := make([]byte, 64)
			for i := 0; i < n; i++ {
				inflight <- struct{}{}
				copy(payload, fmt.Sprintf("%06d", i))
				if err := c.Send(ctx, payload); err != nil {
					panic(err)
				}
			}
		}()
		for got := 0; got < n; {
			ev, err := c.Next(ctx)
			if err != nil {
				panic(err)
			}
			if m, ok := ev.(tether.Message); ok {
				if k, _ := strconv.Atoi(string(m.Payload[:6])); k != got {
					panic("out of order")
				}
				got++
				<-inflight
			}
		}
		el := time.Since(started).Seconds()
		_ = c.Close()
		fmt.Printf("go throughput: %d messages of 64 B each way in %.2f s = %.0f msg/s each way\n", n, el, float64(n)/el)
	case "idle":
		time.Sleep(500 * time.Millisecond)
		runtime.GC()
		before := rssKiB()
		cs := make([]*tether.Client, n)
		for i := range cs {
			c, err := tether.Start(ctx, tether.Config{Addr: addr, ClientID: fmt.Sprintf("idle-go-%d", i)})
			if err != nil {
				panic(err)
			}
			cs[i] = c
		}
		for _, c := range cs {
			waitConnected(c)
		}
		time.Sleep(3 * time.Second)
		runtime.GC()
		after := rssKiB()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fmt.Printf("go idle: %d connections, RSS %d KiB -> %d KiB, %.1f KiB per connection (Go stacks %.1f KiB, heap %.1f KiB per connection)\n",
			n, before, after, float64(after-before)/float64(n), float64(ms.StackInuse)/1024/float64(n), float64(ms.HeapInuse)/1024/float64(n))
		for _, c := range cs {
			_ = c.Close()
		}
	}
}
